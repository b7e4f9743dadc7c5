"""Backends run the two graphs of the split; everything else (the schedule) is host code in `session`.

A backend takes and returns numpy arrays named as in the manifest:
- `vision(pixel_values, position_ids, patch_mask, pos_embed) -> features`
- `llm(inputs_embeds, position_ids, attention_mask, last_index, past_keys, past_values)
   -> (logits, new_keys, new_values)`
A backend whose graph keeps the KV cache as state sets `owns_cache = True`: it gets the same inputs (with
empty past_keys / past_values), writes the new K/V itself, returns (logits, None, None) and has `reset()`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from minicpm.errors import UserError

BACKENDS = ("torch", "onnxruntime")  # each format's exporter issue adds its runtime here


class TorchBackend:
    """The eager PyTorch modules of the same split (minicpm.split), from the checkpoint."""

    name = "torch"

    def __init__(self, source: str, max_context: int):
        from minicpm.checkpoint import Checkpoint  # noqa: PLC0415
        from minicpm.split import LanguageModelStep, VisionStep  # noqa: PLC0415

        model, _ = Checkpoint.open(source).load_model("float32")
        self.vision_step = VisionStep(model).eval()
        self.llm_step = LanguageModelStep(model, max_context).eval()

    @torch.no_grad()
    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        return self.vision_step(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()

    @torch.no_grad()
    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out = self.llm_step(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()})
        return tuple(t.numpy() for t in out)


class OnnxRuntimeBackend:
    """onnxruntime sessions over the exported `vision` and `llm` graphs (CPU)."""

    name = "onnxruntime"

    def __init__(self, vision_path: Path, llm_path: Path, threads: int | None = None):
        import onnxruntime as ort  # noqa: PLC0415

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
        options.log_severity_level = 3
        try:
            self.vision_session = ort.InferenceSession(str(vision_path), options, providers=["CPUExecutionProvider"])
            self.llm_session = ort.InferenceSession(str(llm_path), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 (an unloadable graph is named, not dumped)
            raise UserError(f"onnxruntime cannot load the graphs: {str(e).splitlines()[0]}") from None

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        return self.vision_session.run(None, inputs)[0]

    def llm(self, **inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.llm_session.run(None, inputs))


def open_backend(name: str, directory: Path, manifest: dict, threads: int | None = None):
    """The backend `name` for an export directory whose manifest has been verified."""
    from runtime.manifest import artifact_path  # noqa: PLC0415

    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "torch":
        return TorchBackend(manifest["model"].get("source", ""), manifest["schedule"]["max_context"])
    if manifest["format"] != "onnx":
        raise UserError(f"backend {name} runs ONNX exports; this directory holds a {manifest['format']} export")
    return OnnxRuntimeBackend(artifact_path(directory, manifest, "vision"), artifact_path(directory, manifest, "llm"),
                              threads)
