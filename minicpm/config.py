"""Checkpoint config.json -> the variant and the sub-configs our modules are built from."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from transformers import LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config, WhisperConfig
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig

from minicpm.errors import UserError
from minicpm.image_processing import SliceConfig


@dataclass(frozen=True)
class Variant:
    """One member of the family: what its config.json says and how we build it."""

    name: str  # our name, e.g. "minicpm-v-4"
    model_type: str  # config.json "model_type": "minicpmv" or "minicpmo"
    version: float  # config.json "version"
    llm: str  # "llama", "qwen2" or "qwen3"
    resampler: str  # "2d" or "3d" (temporal ids for video frames)
    hub_id: str

    @property
    def thinking(self) -> bool:
        """Qwen3-based models take `enable_thinking` in their chat template."""
        return self.llm == "qwen3"


VARIANTS = [
    Variant("minicpm-v-4", "minicpmv", 4.0, "llama", "2d", "openbmb/MiniCPM-V-4"),
    Variant("minicpm-v-4.5", "minicpmv", 4.5, "qwen3", "3d", "openbmb/MiniCPM-V-4_5"),
    Variant("minicpm-o-4.5", "minicpmo", 4.5, "qwen3", "2d", "openbmb/MiniCPM-o-4_5"),
    Variant("minicpm-o-2.6", "minicpmo", 2.6, "qwen2", "2d", "openbmb/MiniCPM-o-2_6"),
    Variant("minicpm-v-2.6", "minicpmv", 2.6, "qwen2", "2d", "openbmb/MiniCPM-V-2_6"),
]
LLM_CONFIGS: dict[str, type[PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}
# Sub-configs and remote-code plumbing that must not leak into the LLM config.
_NOT_LLM_KEYS = {"vision_config", "audio_config", "tts_config", "slice_config", "auto_map", "architectures",
                 "model_type", "transformers_version", "_name_or_path"}


def find_variant(raw: dict) -> Variant:
    model_type = raw.get("model_type")
    if model_type in ("minicpmv4_6", "minicpmv4_7"):
        raise UserError(f"config.json: model_type {model_type!r} is a hybrid-attention MiniCPM-V (4.6/4.7): "
                        "load it with minicpm.v4_6 (HybridCheckpoint, load_model)")
    if model_type not in ("minicpmv", "minicpmo"):
        raise UserError(f"config.json: model_type {model_type!r} is not a MiniCPM-V/o model "
                        "(expected 'minicpmv' or 'minicpmo')")
    if "version" not in raw:
        raise UserError("config.json: missing 'version' (needed to pick the MiniCPM variant)")
    try:
        version = float(raw["version"])
    except (TypeError, ValueError):
        raise UserError(f"config.json: version {raw['version']!r} is not a number") from None
    for v in VARIANTS:
        if v.model_type == model_type and abs(v.version - version) < 1e-6:
            return v
    known = ", ".join(f"{v.model_type} {v.version}" for v in VARIANTS)
    raise UserError(f"config.json: unknown version {raw['version']!r} for model_type {model_type!r} "
                    f"(supported: {known})")


@dataclass
class MiniCPMConfig:
    """The parsed checkpoint config: variant, LLM config, vision config and the multimodal settings."""

    raw: dict
    variant: Variant
    llm: PretrainedConfig
    vision: Idefics2VisionConfig
    slice: SliceConfig
    query_num: int
    use_image_id: bool
    drop_vision_last_layer: bool
    scale_emb: float | None  # multiplies the text token embeddings when present (upstream V-4.0 rule)
    audio: WhisperConfig | None = None  # o-models that initialise audio (`init_audio`): the `apm` encoder
    audio_pool_step: int = 5  # AvgPool1d kernel = stride over encoder frames (o-4.5: 5, o-2.6: 2)
    audio_chunk_length: float = 1.0  # seconds per block of the encoder's block-causal mask

    @property
    def audio_chunk_frames(self) -> int:
        """Encoder frames per chunk of the block-causal mask (upstream `int(chunk_length * 50)`)."""
        return int(self.audio_chunk_length * 50)

    @property
    def hidden_size(self) -> int:
        return self.llm.hidden_size

    @property
    def vision_layers(self) -> int:
        """Encoder layers actually built (the last is dropped when the checkpoint says so)."""
        n = self.vision.num_hidden_layers
        return n - 1 if self.drop_vision_last_layer else n

    @property
    def has_audio(self) -> bool:
        return self.audio is not None

    @classmethod
    def from_dict(cls, raw: dict) -> MiniCPMConfig:
        """Parse config.json's contents; anything transformers' config classes reject is one UserError."""
        if not isinstance(raw, dict):
            raise UserError(f"config.json must hold a JSON object, got {type(raw).__name__}")
        try:
            config = cls._from_dict(raw)
            _check_sizes(config)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (config.json is user input: whatever it breaks is named in one line)
            raise UserError(f"config.json is not a valid MiniCPM config ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else 'bad value'})") from None
        return config

    @classmethod
    def _from_dict(cls, raw: dict) -> MiniCPMConfig:
        variant = find_variant(raw)
        llm_kwargs = {k: v for k, v in raw.items() if k not in _NOT_LLM_KEYS}
        llm = LLM_CONFIGS[variant.llm](**llm_kwargs)
        llm._attn_implementation = "sdpa"
        vision_raw = dict(raw.get("vision_config") or {})
        for k in ("model_type", "architectures", "_name_or_path", "transformers_version"):
            vision_raw.pop(k, None)
        vision = Idefics2VisionConfig(**vision_raw)
        vision._attn_implementation = "sdpa"
        sc = raw.get("slice_config") or {}
        slice_config = SliceConfig(
            patch_size=int(sc.get("patch_size", raw.get("patch_size", 14))),
            max_slice_nums=int(sc.get("max_slice_nums", raw.get("max_slice_nums", 9))),
            scale_resolution=int(sc.get("scale_resolution", raw.get("scale_resolution", 448))),
            slice_mode=bool(raw.get("slice_mode", True)),
        )
        audio = None
        if variant.model_type == "minicpmo" and bool(raw.get("init_audio", True)):
            audio_raw = {k: v for k, v in (raw.get("audio_config") or {}).items()
                         if k not in ("model_type", "architectures", "_name_or_path", "transformers_version")}
            audio = WhisperConfig(**audio_raw)  # upstream: WhisperConfig() when audio_config is absent
            audio._attn_implementation = "sdpa"
        return cls(
            raw=raw,
            variant=variant,
            llm=llm,
            vision=vision,
            slice=slice_config,
            query_num=int(raw.get("query_num", 64)),
            use_image_id=bool(raw.get("use_image_id", True)),
            drop_vision_last_layer=bool(raw.get("drop_vision_last_layer", True)),
            scale_emb=raw.get("scale_emb"),
            audio=audio,
            audio_pool_step=int(raw.get("audio_pool_step", 5)),
            audio_chunk_length=float(raw.get("audio_chunk_length", 1.0)),
        )

    @classmethod
    def from_dir(cls, path: str | Path) -> MiniCPMConfig:
        f = Path(path) / "config.json"
        if not f.is_file():
            raise UserError(f"{path}: no config.json (not a MiniCPM checkpoint directory)")
        try:
            raw = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UserError(f"{f}: invalid JSON ({str(e).splitlines()[0][:200]})") from None
        return cls.from_dict(raw)


# Sizes the model is built from: each a positive int, bounded so a hostile config cannot ask for petabytes.
_SIZE_LIMITS = {"hidden_size": 1 << 16, "intermediate_size": 1 << 18, "num_hidden_layers": 1 << 10,
                "num_attention_heads": 1 << 10, "num_key_value_heads": 1 << 10, "vocab_size": 1 << 22,
                "head_dim": 1 << 12}


def _check_sizes(config: MiniCPMConfig) -> None:
    for part, section in (("", config.llm), ("vision_config.", config.vision)):
        for name, limit in _SIZE_LIMITS.items():
            value = getattr(section, name, None)
            if value is None and name in ("head_dim", "vocab_size", "num_key_value_heads"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
                raise UserError(f"config.json: {part}{name} must be an integer in 1..{limit}, got {value!r}")
    if config.llm.num_attention_heads % (config.llm.num_key_value_heads or 1):
        raise UserError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
    if not 1 <= config.query_num <= 4096 or config.slice.patch_size < 1 or config.slice.scale_resolution < 1 \
            or config.slice.max_slice_nums < 1:
        raise UserError("config.json: query_num, patch_size, scale_resolution and max_slice_nums must be positive")
    if config.audio is not None:
        _check_audio(config)


def _check_audio(config: MiniCPMConfig) -> None:
    a = config.audio
    for name in ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "num_mel_bins",
                 "max_source_positions"):
        value = getattr(a, name)
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 1 << 16:
            raise UserError(f"config.json: audio_config.{name} must be an integer in 1..65536, got {value!r}")
    # Upstream sizes the projection's input as encoder_ffn_dim // 4 but feeds it d_model-wide states.
    if a.encoder_ffn_dim // 4 != a.d_model:
        raise UserError(f"config.json: audio_config.encoder_ffn_dim // 4 ({a.encoder_ffn_dim // 4}) must equal d_model "
                        f"({a.d_model}): upstream sizes audio_projection_layer's input that way")
    if a.d_model % a.encoder_attention_heads:
        raise UserError("config.json: audio_config.d_model must be a multiple of encoder_attention_heads")
    if not 1 <= config.audio_pool_step <= 50 or not 0 < config.audio_chunk_length <= 30:
        raise UserError(f"config.json: audio_pool_step {config.audio_pool_step} (1..50) or audio_chunk_length "
                        f"{config.audio_chunk_length} (0..30 s) out of range")
