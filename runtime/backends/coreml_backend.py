"""The Core ML backend (macOS): the packages of an export, the KV cache / per-layer state as Core ML state."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from minicpm.errors import UserError
from runtime.backends.call_shapes import pad_state_call


class CoreMLBackend:
    """The packages of `export.coreml` through Core ML (macOS 15+ only): `vision.mlpackage` one slice per call,
    `llm.mlpackage`'s `prefill` / `decode` functions sharing one KV state (`make_state()`), so `owns_cache`;
    MiniCPM-o: `audio.mlpackage` one 1 s chunk per call with the encoder cache as its own state
    (`owns_audio_cache`: earlier clips' slots are masked, so one state serves every clip). A hybrid export
    (MiniCPM-V 4.6 / 4.7, `schedule.state`): the step's per-layer state is the package state (`owns_state`: the
    session sends none and gets the logits only), a call of fewer tokens runs the prefill function padded, and the
    vision package takes one slice's fixed-shape inputs as they are."""

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
        self.owns_state = "state" in manifest["schedule"]  # hybrid: the package's states are the whole step state
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
        if self.owns_state:  # hybrid: the session hands one slice's fixed-shape inputs
            feed = {k: np.ascontiguousarray(inputs[k]).astype(dt) for k, dt in self.vision_dtypes.items()}
            return self.vision_model.predict(feed)["features"].astype(np.float32)
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

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, ...]:
        """(logits, None, None) for the KV-cache models; (logits,) for a hybrid export (`owns_state`)."""
        tokens = inputs["inputs_embeds"].shape[1]
        if self.owns_state:  # a shorter call runs the next wider function padded (valid_tokens: the real rows)
            width = min((t for t in self.functions if t >= tokens), default=None)
            if width is not None and width != tokens:
                inputs = pad_state_call(inputs, width)
            tokens = width or tokens
        if tokens not in self.functions:
            raise UserError(f"the Core ML LLM takes {' or '.join(map(str, sorted(self.functions)))} tokens per call, "
                            f"got {tokens}")
        feed = {k: np.ascontiguousarray(inputs[k]).astype(dt) for k, dt in self.llm_dtypes.items()}
        logits = self.functions[tokens].predict(feed, state=self.state)["logits"].astype(np.float32)
        return (logits,) if self.owns_state else (logits, None, None)

    def audio(self, **inputs: np.ndarray) -> tuple[np.ndarray, None, None]:
        """One 1 s chunk (the empty past_keys / past_values are ignored: the cache is the package's state)."""
        if self.audio_model is None:
            raise UserError("this Core ML export has no audio package (audio needs a MiniCPM-o export)")
        feed = {k: np.ascontiguousarray(inputs[k]).astype(dt) for k, dt in self.audio_dtypes.items()}
        tokens = self.audio_model.predict(feed, state=self.audio_state)["tokens"]
        return tokens.astype(np.float32), None, None
