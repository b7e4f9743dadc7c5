"""Backends run the two graphs of the split; everything else (the schedule) is host code in `session`.

A backend takes and returns numpy arrays named as in the manifest:
- `vision(pixel_values, position_ids, patch_mask, pos_embed) -> features`
- `video(...)`: the same inputs with a frame-slot axis after the first ([groups, frames, ...]) -> one feature
  block per group (MiniCPM-V 4.5 exports only: the manifest's `steps.video`)
- `llm(inputs_embeds, position_ids, attention_mask, last_index, past_keys, past_values)
   -> (logits, new_keys, new_values)`
- `audio(mel, conv_mask, position_ids, attention_mask, past_keys, past_values) -> (tokens, new_keys, new_values)`:
  one 1 s chunk with the encoder cache of the clip's earlier chunks (MiniCPM-o exports only: `steps.audio`,
  host side in runtime/audio_chunks.py); a backend keeping that cache as state sets `owns_audio_cache`.
A backend whose graph keeps the KV cache as state sets `owns_cache = True`: it gets the same inputs (with
empty past_keys / past_values), writes the new K/V itself, returns (logits, None, None) and has `reset()`.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from minicpm.errors import UserError

# A hybrid export's step inputs besides its state (minicpm.hybrid_step; the state: the backend's, or named inputs)
STATE_STEP_INPUTS = ("inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens")
BACKENDS = ("torch", "onnxruntime", "coreml", "executorch", "coreai")  # each exporter issue adds its runtime here
# The runtime each export format runs on unless --backend says otherwise (torch runs any export's split).
DEFAULT_BACKENDS = {"onnx": "onnxruntime", "executorch": "executorch", "coreml": "coreml", "coreai": "coreai"}


def default_backend(manifest: dict) -> str:
    """The backend of the export's own format (Core ML: macOS only; CoreMLBackend says so elsewhere)."""
    return DEFAULT_BACKENDS[manifest["format"]]


class TorchBackend:
    """The eager PyTorch modules of the same split (minicpm.split), from the checkpoint."""

    name = "torch"

    def __init__(self, source: str, max_context: int):
        from minicpm.checkpoint import Checkpoint  # noqa: PLC0415
        from minicpm.split import AudioChunkStep, LanguageModelStep, VideoGroupStep, VisionStep  # noqa: PLC0415

        model, _ = Checkpoint.open(source).load_model("float32")
        self.vision_step = VisionStep(model).eval()
        self.video_step = VideoGroupStep(model).eval() if model.resampler.temporal else None
        self.llm_step = LanguageModelStep(model, max_context).eval()
        self.audio_step = AudioChunkStep(model).eval() if hasattr(model, "apm") else None

    @torch.no_grad()
    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        return self.vision_step(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    @torch.no_grad()
    def video(self, **inputs: np.ndarray) -> np.ndarray:
        return self.video_step(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    @torch.no_grad()
    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.llm_step(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
        return tuple(t.numpy() for t in out)

    @torch.no_grad()
    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.audio_step(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
        return tuple(t.numpy() for t in out)


class HybridTorchBackend:
    """The eager hybrid steps of a MiniCPM-V 4.6 / 4.7 checkpoint: `llm(...)` (`minicpm.hybrid_step`) takes the
    step's inputs and every state tensor by name, and returns the logits and one update per state tensor;
    `vision(...)` (`minicpm.hybrid_vision`, when the export has `steps.vision`) one slice's fixed-shape inputs."""

    name = "torch"
    VISION_INPUTS = ("pixel_values", "position_ids", "patch_order", "patch_mask")

    def __init__(self, source: str, schedule: dict):
        from minicpm.hybrid_step import HybridLanguageModelStep  # noqa: PLC0415
        from minicpm.hybrid_vision import HybridVisionStep  # noqa: PLC0415
        from minicpm.v4_6 import load_model  # noqa: PLC0415

        model, _ = load_model(source, "float32")
        self.llm_step = HybridLanguageModelStep(model, schedule["max_context"], schedule["prefill_chunk"]).eval()
        vision = schedule["steps"].get("vision")
        self.vision_step = HybridVisionStep(model, vision["downsample_mode"]).eval() if vision else None

    @torch.no_grad()
    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        return self.vision_step(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in self.VISION_INPUTS)
                                ).numpy()

    @torch.no_grad()
    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        names = ["inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens",
                 *self.llm_step.spec.names]
        out = self.llm_step(*(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in names))
        return tuple(t.numpy() for t in out)


class OnnxRuntimeBackend:
    """onnxruntime sessions over the exported `vision` and `llm` graphs (CPU)."""

    name = "onnxruntime"

    def __init__(self, vision_path: Path | None, llm_path: Path, threads: int | None = None,
                 video_path: Path | None = None, audio_path: Path | None = None):
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.log_severity_level = 3

        def load(path: Path):
            try:
                return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            except Exception as e:  # noqa: BLE001 (an unloadable graph is named, not dumped)
                raise UserError(f"onnxruntime cannot load {path.name}: {str(e).splitlines()[0]}") from None

        # No vision graph: a text-only hybrid export (the session refuses images before any call).
        self.vision_session = load(vision_path) if vision_path else None
        self.llm_session = load(llm_path)
        self.video_session = load(video_path) if video_path else None
        self.audio_session = load(audio_path) if audio_path else None

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        return self.vision_session.run(None, inputs)[0]

    def video(self, **inputs: np.ndarray) -> np.ndarray:
        return self.video_session.run(None, inputs)[0]

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.llm_session.run(None, inputs))

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.audio_session.run(None, inputs))


class CoreMLBackend:
    """The packages of `export.coreml` through Core ML (macOS 15+ only): `vision.mlpackage` one slice per call,
    `llm.mlpackage`'s `prefill` / `decode` functions sharing one KV state (`make_state()`), so `owns_cache`;
    MiniCPM-o: `audio.mlpackage` one 1 s chunk per call with the encoder cache as its own state
    (`owns_audio_cache`: earlier clips' slots are masked, so one state serves every clip)."""

    name = "coreml"
    owns_cache = True
    owns_audio_cache = True

    def __init__(self, directory: Path, manifest: dict):
        if sys.platform != "darwin":
            raise UserError(f"backend coreml needs macOS 15+ (Core ML runs models only on Apple platforms, this is "
                            f"{sys.platform}); here use --backend torch, or an ONNX export with onnxruntime")
        if manifest["format"] != "coreml":
            raise UserError(f"backend coreml runs Core ML exports; this directory holds a {manifest['format']} export")
        import coremltools as ct  # noqa: PLC0415

        from runtime.manifest import artifact_path  # noqa: PLC0415

        units = manifest["schedule"]["coreml"]["compute_units"]

        def load(artifact: str, function: str | None):
            path = artifact_path(directory, manifest, artifact)
            try:
                return ct.models.MLModel(str(path), compute_units=getattr(ct.ComputeUnit, units[artifact].upper()),
                                         function_name=function)
            except Exception as e:  # noqa: BLE001 (an unloadable package is named, not dumped)
                raise UserError(f"Core ML cannot load {path.name} ({function or 'main'}): "
                                f"{str(e).splitlines()[0]}") from None

        steps = manifest["schedule"]["steps"]
        self.vision_model = load("vision", None)
        video = steps.get("video")
        self.video_model = load(video["artifact"], video["function"]) if video else None
        self.functions = {steps[s]["tokens"]: load("llm", steps[s]["function"]) for s in ("prefill", "decode")}
        artifacts = manifest["artifacts"]
        self.vision_dtypes = {t["name"]: np.dtype(t["dtype"]) for t in artifacts["vision"]["inputs"]}
        self.llm_dtypes = {t["name"]: np.dtype(t["dtype"])
                           for t in artifacts["llm"]["functions"][steps["decode"]["function"]]["inputs"]}
        audio = steps.get("audio")
        self.audio_model = load(audio["artifact"], None) if audio else None  # a single-function package
        self.audio_dtypes = {t["name"]: np.dtype(t["dtype"]) for t in artifacts[audio["artifact"]]["inputs"]} \
            if audio else {}
        self.reset()

    def reset(self) -> None:
        """Fresh (zeroed) KV and audio encoder states: a new conversation."""
        self.state = self.functions[1].make_state()
        self.audio_state = self.audio_model.make_state() if self.audio_model else None

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        out = []
        for i in range(len(inputs["pixel_values"])):  # the package takes one slice per call
            feed = {k: np.ascontiguousarray(inputs[k][i:i + 1]).astype(dt) for k, dt in self.vision_dtypes.items()}
            out.append(self.vision_model.predict(feed)["features"])
        return np.concatenate(out).astype(np.float32)

    def video(self, **inputs: np.ndarray) -> np.ndarray:
        out = []
        for i in range(len(inputs["pixel_values"])):  # one frame group per call
            feed = {k: np.ascontiguousarray(inputs[k][i:i + 1]).astype(dt) for k, dt in self.vision_dtypes.items()}
            out.append(self.video_model.predict(feed)["features"])
        return np.concatenate(out).astype(np.float32)

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        tokens = inputs["inputs_embeds"].shape[1]
        if tokens not in self.functions:
            raise UserError(f"the Core ML LLM takes {' or '.join(map(str, sorted(self.functions)))} tokens per call, "
                            f"got {tokens}")
        feed = {k: np.ascontiguousarray(inputs[k]).astype(dt) for k, dt in self.llm_dtypes.items()}
        logits = self.functions[tokens].predict(feed, state=self.state)["logits"]
        return logits.astype(np.float32), None, None

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        """One 1 s chunk (the empty past_keys / past_values are ignored: the cache is the package's state)."""
        if self.audio_model is None:
            raise UserError("this Core ML export has no audio package (audio needs a MiniCPM-o export)")
        feed = {k: np.ascontiguousarray(inputs[k]).astype(dt) for k, dt in self.audio_dtypes.items()}
        tokens = self.audio_model.predict(feed, state=self.audio_state)["tokens"]
        return tokens.astype(np.float32), None, None


class ExecuTorchBackend:
    """The `.pte` program of `python -m export.executorch` through `executorch.runtime` (XNNPACK on CPU).

    Stateful: `text_decoder` keeps the KV cache in its mutable buffers `k_cache_{i}` / `v_cache_{i}`
    (`owns_cache`), and `audio_encoder` (MiniCPM-o) the clip's encoder cache in `audio_k_cache_{i}` /
    `audio_v_cache_{i}` (`owns_audio_cache`). The vision method takes one slice per call, so a batch runs slice
    by slice.
    """

    name = "executorch"
    owns_cache = True
    owns_audio_cache = True

    def __init__(self, path: Path, steps: dict, layers: int, threads: int | None = None):
        from executorch.runtime import Runtime  # noqa: PLC0415

        self.path, self.layers = path, layers
        self.functions = {step: spec.get("function", step) for step, spec in steps.items()}
        self.runtime = Runtime.get()
        if threads:
            from executorch.extension.pybindings import portable_lib  # noqa: PLC0415

            portable_lib._unsafe_reset_threadpool(threads)  # XNNPACK's pool (default: one thread per core)
        if not self.runtime.backend_registry.is_available("XnnpackBackend"):
            raise UserError("this executorch build has no XnnpackBackend")
        self._load()

    def _load(self) -> None:
        try:
            self.program = self.runtime.load_program(self.path)
            self.vision_method = self.program.load_method(self.functions["vision"])
            self.video_method = self.program.load_method(self.functions["video"]) if "video" in self.functions \
                else None
            self.audio_method = self.program.load_method(self.functions["audio"]) if "audio" in self.functions \
                else None
            self.decoder = self.program.load_method(self.functions["prefill"])
        except Exception as e:  # noqa: BLE001 (an unloadable program is named, not dumped)
            raise UserError(f"executorch cannot load {self.path.name}: {str(e).splitlines()[0]} (programs lowered "
                            "to Core ML load on Apple platforms only)") from None
        # The cache buffers by name (the exporter emits the names): tensors aliasing the program's memory.
        try:
            self.cache = [self.decoder._method.get_attribute(f"{kind}_cache_{i}")
                          for i in range(self.layers) for kind in ("k", "v")]
        except Exception:  # noqa: BLE001 (a program without buffer names: reset() reloads instead)
            self.cache = None

    def reset(self) -> None:
        """Empty conversation: zero the cache buffers in place (or, without their names, reload the program:
        a fresh load has zeroed buffers). Correctness only needs finite values, as masked slots contribute
        exact zeros; zeroing makes a reset conversation identical to one on a freshly loaded program."""
        if self.cache is None:
            self._load()
            return
        for buffer in self.cache:
            buffer.zero_()

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        names = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
        batch = len(inputs[names[0]])
        out = [self.vision_method.execute([_tensor(inputs[n][i:i + 1]) for n in names])[0] for i in range(batch)]
        return torch.cat(out).numpy()

    def video(self, **inputs: np.ndarray) -> np.ndarray:
        names = ("pixel_values", "position_ids", "patch_mask", "pos_embed")
        groups = len(inputs[names[0]])  # one frame group per call
        return torch.cat([self.video_method.execute([_tensor(inputs[n][i:i + 1]) for n in names])[0]
                          for i in range(groups)]).numpy()

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        names = ("inputs_embeds", "position_ids", "attention_mask", "last_index")  # past K/V: in the program
        logits = self.decoder.execute([_tensor(inputs[n]) for n in names])[0]
        return logits.numpy(), None, None

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        if self.audio_method is None:
            raise UserError("this ExecuTorch export has no audio_encoder method (audio needs a MiniCPM-o export)")
        names = ("mel", "conv_mask", "position_ids", "attention_mask")  # past K/V: in the program
        tokens = self.audio_method.execute([_tensor(inputs[n]) for n in names])[0]
        return tokens.numpy(), None, None


class CoreAIBackend:
    """The assets of `python -m export.coreai` through `coreai.runtime` (the in-package CPU runtime on Linux, the
    OS framework on macOS 27+): `vision.aimodel` one slice per call, `llm.aimodel`'s `prefill` / `decode`. The
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
        weakref.finalize(self, _close_loop, self.loop, self.stack)  # removes the executables' temporary files

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
            feed = {n: inputs[n] for n in STATE_STEP_INPUTS} if width == tokens else _pad_state_call(inputs, width)
            return (self._call(self.functions[width], feed, self.state)["logits"].numpy().astype(np.float32),)
        names = ("inputs_embeds", "position_ids", "attention_mask", "last_index")  # past K/V: the state
        feed = {n: inputs[n] for n in names} if width == tokens else _pad_call(inputs, width)
        logits = self._call(self.functions[width], feed, self.state)["logits"].numpy()
        return logits.astype(np.float32), None, None

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        """One 1 s chunk (the empty past_keys / past_values are ignored: the cache is the audio state)."""
        if self.audio_function is None:
            raise UserError("this Core AI export has no audio asset (audio needs a MiniCPM-o export)")
        names = ("mel", "conv_mask", "position_ids", "attention_mask")
        tokens = self._call(self.audio_function, {n: inputs[n] for n in names}, self.audio_state)["tokens"].numpy()
        return tokens.astype(np.float32), None, None


def _pad_call(inputs: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """A call of T new tokens as one of `width` (a shorter prefill chunk on the fixed-width prefill function):
    pad rows see only the new rows up to themselves, and their K/V land in slots the mask never shows before
    real tokens overwrite them (slot == position, and the state has `width` slack slots past the context)."""
    x, mask = inputs["inputs_embeds"], inputs["attention_mask"]
    tokens = x.shape[1]
    context = mask.shape[-1] - tokens
    embeds = np.zeros((1, width, x.shape[2]), dtype=x.dtype)
    embeds[:, :tokens] = x
    start = int(inputs["position_ids"][0, 0])
    positions = np.minimum(np.arange(start, start + width), context - 1).astype(np.int64)[None]
    low = np.finfo(mask.dtype).min
    padded = np.full((1, 1, width, context + width), low, dtype=mask.dtype)
    padded[..., :tokens, :context + tokens] = mask
    padded[..., tokens:, context:] = np.triu(np.full((width, width), low, dtype=mask.dtype), 1)[tokens:]
    return {"inputs_embeds": embeds, "position_ids": positions, "attention_mask": padded,
            "last_index": inputs["last_index"]}


def _pad_state_call(inputs: dict[str, np.ndarray], width: int) -> dict[str, np.ndarray]:
    """A hybrid step call of T tokens as one of `width` (a fixed-width prefill function): zero pad rows after the
    real ones, kept out of the linear state by `valid_tokens` (unchanged); their K/V land in slots past the real
    ones, masked until real tokens overwrite them (the state has `width` slack slots). Pad rows see the cached
    columns as row 0 does (the graph reads the cache length from row 0) and the new rows causally."""
    x, mask, positions = inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"]
    tokens = x.shape[1]
    context = mask.shape[-1] - tokens
    embeds = np.zeros((1, width, x.shape[2]), dtype=x.dtype)
    embeds[:, :tokens] = x
    low = np.finfo(mask.dtype).min
    padded = np.full((1, 1, width, context + width), low, dtype=mask.dtype)
    padded[..., :tokens, :context + tokens] = mask
    padded[..., tokens:, :context] = mask[..., :1, :context]
    padded[..., tokens:, context:] = np.triu(np.full((width, width), low, dtype=mask.dtype), 1)[tokens:]
    return {"inputs_embeds": embeds, "position_ids": np.pad(positions, ((0, 0), (0, width - tokens)), mode="edge"),
            "attention_mask": padded, "last_index": inputs["last_index"], "valid_tokens": inputs["valid_tokens"]}


def _close_loop(loop, stack) -> None:
    if not loop.is_closed():
        with native_stderr_silenced():
            loop.run_until_complete(stack.aclose())
        loop.close()


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for a block: native libraries' log lines (the Core AI runtime logs every
    function it loads) that Python's sys.stderr cannot catch."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A copy with ordinary strides: numpy's `[None]` axes have stride 0, which ExecuTorch rejects."""
    return torch.empty(array.shape, dtype=torch.from_numpy(array[:0]).dtype).copy_(torch.from_numpy(array))


def reference_source(manifest: dict) -> str:
    """The checkpoint holding the export's exact weights, for the eager torch reference."""
    source = manifest["model"].get("source", "")
    quantized = manifest.get("quantization", {}).get("method", "none") != "none"
    if quantized and not (Path(source) / "quant_config.json").is_file():
        # The records were computed during the export: the checkpoint holds float weights only.
        raise UserError(f"this export is {manifest['quantization']['method']}, but its source {source} is a float "
                        "checkpoint: the torch reference would run other weights. Quantise with python -m quant.awq "
                        "and export that directory, or use the export's own backend")
    if not Path(source).is_dir():
        raise UserError(f"the export's source checkpoint {source or '(none)'} is missing (the torch reference runs it)")
    return source


def open_backend(name: str, directory: Path, manifest: dict, threads: int | None = None):
    """The backend `name` for an export directory whose manifest has been verified."""
    from runtime.manifest import artifact_path  # noqa: PLC0415

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "torch":
        if "state" in manifest["schedule"]:
            return HybridTorchBackend(reference_source(manifest), manifest["schedule"])
        return TorchBackend(reference_source(manifest), manifest["schedule"]["max_context"])
    if name == "executorch":
        if manifest["format"] != "executorch":
            raise UserError(f"backend executorch runs ExecuTorch exports; this directory holds a {manifest['format']} "
                            "export")
        schedule = manifest["schedule"]
        return ExecuTorchBackend(artifact_path(directory, manifest, schedule["steps"]["prefill"]["artifact"]),
                                 schedule["steps"], schedule["kv_cache"]["layers"], threads)
    if name == "coreml":
        return CoreMLBackend(directory, manifest)
    if name == "coreai":
        return CoreAIBackend(directory, manifest)
    if manifest["format"] != "onnx":
        raise UserError(f"backend {name} runs ONNX exports; this directory holds a {manifest['format']} export")
    steps = manifest["schedule"]["steps"]
    vision, video, audio = steps.get("vision"), steps.get("video"), steps.get("audio")
    return OnnxRuntimeBackend(artifact_path(directory, manifest, vision["artifact"]) if vision else None,
                              artifact_path(directory, manifest, steps["prefill"]["artifact"]),
                              threads, artifact_path(directory, manifest, video["artifact"]) if video else None,
                              artifact_path(directory, manifest, audio["artifact"]) if audio else None)
