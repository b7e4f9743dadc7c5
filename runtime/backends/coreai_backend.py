"""The Core AI backend (Linux and macOS): the assets of an export through `coreai.runtime`, state as Core AI state."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np

from minicpm.errors import UserError
from runtime.backends.call_shapes import STATE_STEP_INPUTS, close_loop, native_stderr_silenced, pad_call, pad_state_call


class CoreAIBackend:
    """The assets of `python -m export.coreai` through `coreai.runtime` (the in-package CPU runtime on Linux, the
    OS framework on macOS 27+): `vision.aimodel` one slice per call (a hybrid export's: one slice's fixed-shape
    inputs, named by `steps.vision.inputs`), `llm.aimodel`'s `prefill` / `decode`. The
    KV cache is the functions' state: arrays passed with every call and updated in place, one set shared by both
    functions (`owns_cache`); `reset()` gives fresh zeroed arrays. MiniCPM-o: `audio.aimodel` one 1 s chunk per
    call with the encoder cache as its own state arrays (`owns_audio_cache`: earlier clips' slots are masked, so
    one set serves every clip; zeroed by `reset()` too). The runtime is async: the backend owns an event loop and
    keeps the assets' executables open until it is garbage-collected."""

    name = "coreai"
    owns_cache = True
    owns_audio_cache = True

    def __init__(self, directory: Path, manifest: dict):
        import asyncio  # noqa: PLC0415
        import weakref  # noqa: PLC0415

        from runtime.manifest import artifact_path  # noqa: PLC0415

        if manifest["format"] != "coreai":
            raise UserError(f"backend coreai runs Core AI exports; this directory holds a {manifest['format']} export")
        try:
            from coreai.authoring import AIModelAsset  # noqa: PLC0415
            from coreai.runtime import NDArray  # noqa: PLC0415
        except ImportError:
            raise UserError("backend coreai needs coreai-core: pip install coreai-core==1.0.0b3") from None
        self.NDArray = NDArray
        self.loop, self.stack = asyncio.new_event_loop(), contextlib.AsyncExitStack()
        weakref.finalize(self, close_loop, self.loop, self.stack)  # removes the executables' temporary files

        def load(artifact: str, functions: list[str]) -> list:
            path = artifact_path(directory, manifest, artifact)
            try:
                with native_stderr_silenced():  # the runtime logs every function load on fd 2
                    model = self.loop.run_until_complete(
                        self.stack.enter_async_context(AIModelAsset.load(path).executable()))
                    return [model.load_function(f) for f in functions]
            except Exception as e:  # noqa: BLE001 (an unloadable asset is named, not dumped)
                raise UserError(f"the Core AI runtime cannot load {path.name}: {str(e).strip().splitlines()[0]}") \
                    from None

        schedule = manifest["schedule"]
        steps, state = schedule["steps"], schedule["coreai"]["state"]
        video, vision = steps.get("video"), steps.get("vision")  # a text-only hybrid export has no vision step
        loaded = load(vision["artifact"], [vision.get("function", "main")] + ([video["function"]] if video else [])) \
            if vision else [None]  # one asset: the video function shares the weights
        self.vision_function, self.video_function = loaded[0], (loaded[1] if video else None)
        order = ("prefill", "decode")
        loaded = load(steps["prefill"]["artifact"], [steps[s]["function"] for s in order])
        self.functions = {steps[s]["tokens"]: f for s, f in zip(order, loaded, strict=True)}
        # The state arrays: the KV cache (names, one shape), or a hybrid export's per-layer state (`tensors`)
        tensors = state.get("tensors") or {n: {"shape": state["shape"], "dtype": state["dtype"]}
                                           for n in state["names"]}
        self.states = {n: (tuple(t["shape"]), np.dtype(t["dtype"])) for n, t in tensors.items()}
        self.owns_state = "tensors" in state  # hybrid: the session sends no state and takes the logits only
        self.vision_inputs = vision.get("inputs", ()) if vision else ()
        audio = steps.get("audio")
        self.audio_function = load(audio["artifact"], [audio.get("function", "main")])[0] if audio else None
        self.audio_spec = schedule["coreai"].get("audio_state") if audio else None
        if audio and self.audio_spec is None:
            raise UserError("manifest.json: the Core AI audio step needs schedule.coreai.audio_state")
        self.reset()

    def reset(self) -> None:
        """Fresh zeroed state arrays (the KV cache and the audio encoder cache): a new conversation."""
        self.state = {n: self.NDArray(np.zeros(shape, dtype)) for n, (shape, dtype) in self.states.items()}
        spec = self.audio_spec
        self.audio_state = {n: self.NDArray(np.zeros(spec["shape"], np.dtype(spec["dtype"]))) for n in spec["names"]} \
            if spec else None

    def _call(self, function, inputs: dict[str, np.ndarray], state: dict | None = None) -> dict:
        feed = {k: self.NDArray(np.ascontiguousarray(v, dtype=np.int32 if v.dtype == np.int64 else v.dtype))
                for k, v in inputs.items()}  # the runtime takes int32 where the graph has int64
        return self.loop.run_until_complete(function(feed, state=state or {}))

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        if self.owns_state:  # hybrid: one slice's fixed-shape inputs as the session hands them (steps.vision)
            return self._call(self.vision_function, {n: inputs[n] for n in self.vision_inputs})["features"].numpy() \
                .astype(np.float32)
        names = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
        out = [self._call(self.vision_function, {n: inputs[n][i:i + 1] for n in names})["features"].numpy()
               for i in range(len(inputs["pixel_values"]))]  # the asset takes one slice per call
        return np.concatenate(out).astype(np.float32)

    def video(self, **inputs: np.ndarray) -> np.ndarray:
        names = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
        out = [self._call(self.video_function, {n: inputs[n][i:i + 1] for n in names})["features"].numpy()
               for i in range(len(inputs["pixel_values"]))]  # one frame group per call
        return np.concatenate(out).astype(np.float32)

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """(logits, None, None) for the KV-cache models; (logits,) for a hybrid export (`owns_state`)."""
        tokens = inputs["inputs_embeds"].shape[1]
        width = min((t for t in self.functions if t >= tokens), default=None)
        if width is None:
            raise UserError(f"the Core AI LLM takes at most {max(self.functions)} tokens per call, got {tokens}")
        if self.owns_state:  # past K/V, conv and recurrent state: the arrays in self.state
            feed = {n: inputs[n] for n in STATE_STEP_INPUTS} if width == tokens else pad_state_call(inputs, width)
            return (self._call(self.functions[width], feed, self.state)["logits"].numpy().astype(np.float32),)
        names = ("inputs_embeds", "position_ids", "attention_mask", "last_index")  # past K/V: the state
        feed = {n: inputs[n] for n in names} if width == tokens else pad_call(inputs, width)
        logits = self._call(self.functions[width], feed, self.state)["logits"].numpy()
        return logits.astype(np.float32), None, None

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        """One 1 s chunk (the empty past_keys / past_values are ignored: the cache is the audio state)."""
        if self.audio_function is None:
            raise UserError("this Core AI export has no audio asset (audio needs a MiniCPM-o export)")
        names = ("mel", "conv_mask", "position_ids", "attention_mask")
        tokens = self._call(self.audio_function, {n: inputs[n] for n in names}, self.audio_state)["tokens"].numpy()
        return tokens.astype(np.float32), None, None
