"""The onnxruntime backend: the ONNX graphs of an export, state as graph inputs and outputs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from minicpm.errors import UserError


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
