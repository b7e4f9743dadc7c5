"""What to quantise and how: `QuantConfig`, validated on construction, serialisable to JSON."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, fields

import torch

from minicpm.errors import UserError

GROUP_SIZES = (32, 64, 128)
# Left in full precision unless `quantize_vision=True`: MiniCPM-V's vision tower and resampler, and the
# usual names of vision towers in other multimodal models.
VISION_PATTERNS = (r"^vpm\.", r"^resampler\.", r"(^|\.)vision_(tower|model)\.", r"(^|\.)visual\.")
# Left in full precision unless `quantize_audio=True`: MiniCPM-o's Whisper audio encoder (its projection into the
# LLM, `audio_projection_layer`, is outside the encoder blocks and always stays fp).
AUDIO_PATTERNS = (r"^apm\.",)


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only int4 quantisation settings (AWQ and RTN share them; RTN ignores the search knobs).

    bits / group_size / symmetric: int4 codes in groups of `group_size` input channels (32, 64 or 128),
        with a zero point per group unless `symmetric`.
    alpha_grid: number of AWQ exponents tried, alpha = i / alpha_grid for i in range(alpha_grid).
    clip_search / clip_grid / min_clip_ratio: after scaling, shrink each group's max |w| by ratios from
        1.0 down to `min_clip_ratio` in `clip_grid` steps and keep the one with the lowest output error.
    lm_head / embeddings: "keep" (full precision) or "int8" (per-channel weight-only int8 records).
    quantize_vision: also quantise the vision tower (`vpm.*`; MiniCPM-V's resampler always stays fp).
    quantize_audio: also quantise MiniCPM-o's Whisper encoder blocks (`apm.layers.*`; the audio projection stays fp).
    skip: regular expressions (re.search on qualified module names) of Linears to leave in full precision.
    blocks: paths of the transformer block lists (ModuleList) to process, in execution order; None finds them.
    device: where calibration runs ("cuda", "mps", "cpu"); None picks cuda, then mps, then cpu.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    alpha_grid: int = 20
    clip_search: bool = True
    clip_grid: int = 20
    min_clip_ratio: float = 0.5
    lm_head: str = "keep"
    embeddings: str = "keep"
    quantize_vision: bool = False
    quantize_audio: bool = False
    skip: tuple[str, ...] = ()
    blocks: tuple[str, ...] | None = None
    device: str | None = None

    def __post_init__(self):
        # Frozen dataclass: normalise sequences to tuples through object.__setattr__.
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        if isinstance(self.blocks, str):
            object.__setattr__(self, "blocks", (self.blocks,))
        elif self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
        self._validate()

    def _validate(self) -> None:
        if self.bits != 4:
            raise UserError(f"bits must be 4 (int4 weights; int8 is available for lm_head/embeddings), got {self.bits}")
        if self.group_size not in GROUP_SIZES:
            raise UserError(f"group_size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size}")
        for name in ("symmetric", "clip_search", "quantize_vision", "quantize_audio"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("alpha_grid", "clip_grid"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.min_clip_ratio, int | float) or not 0 < self.min_clip_ratio <= 1:
            raise UserError(f"min_clip_ratio must be in (0, 1], got {self.min_clip_ratio!r}")
        for name in ("lm_head", "embeddings"):
            if getattr(self, name) not in ("keep", "int8"):
                raise UserError(f"{name} must be 'keep' or 'int8', got {getattr(self, name)!r}")
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise UserError(f"skip pattern {pattern!r} is not a valid regular expression ({e})") from None
        if self.blocks is not None and (not self.blocks or not all(isinstance(b, str) and b for b in self.blocks)):
            raise UserError(f"blocks must be module paths like 'llm.model.layers', got {self.blocks!r}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise UserError(f"device {self.device!r} is not a torch device (cpu, cuda, cuda:1, mps)") from None

    # ----- derived --------------------------------------------------------------------------------------

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    def skipped_by(self, name: str) -> str | None:
        """Why `name` stays in full precision by pattern (user skip list, vision tower or audio encoder), else None."""
        for pattern in self.skip:
            if re.search(pattern, name):
                return f"skip pattern {pattern!r}"
        if not self.quantize_vision:
            for pattern in VISION_PATTERNS:
                if re.search(pattern, name):
                    return "vision tower (quantize_vision=False)"
        if not self.quantize_audio:
            for pattern in AUDIO_PATTERNS:
                if re.search(pattern, name):
                    return "audio encoder (quantize_audio=False)"
        return None

    def resolve_device(self) -> torch.device:
        """`device`, or the best available accelerator; refuses a device that is not there."""
        if self.device is None:
            if torch.cuda.is_available():
                return torch.device("cuda")
            if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device {self.device!r} requested but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise UserError(f"device {self.device!r} requested but MPS is not available")
        return device

    # ----- JSON -----------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready settings (the device is a property of the run, not of the result, so it is left out)."""
        d = asdict(self)
        d.pop("device")
        d["skip"] = list(self.skip)
        d["blocks"] = list(self.blocks) if self.blocks is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"quantisation config: unknown keys {', '.join(unknown)}")
        return cls(**d)
