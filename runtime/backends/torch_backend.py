"""The eager torch backends: the split modules of the export's source checkpoint, run as the graphs would be
(the reference every other backend is measured against)."""

from __future__ import annotations

import numpy as np
import torch


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
