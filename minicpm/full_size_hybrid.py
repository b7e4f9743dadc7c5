"""`full-minicpm-v-4.6` / `full-minicpm-v-4.7`: MiniCPM-V 4.6 / 4.7-1B-shaped checkpoints with random weights, built
offline in the real upstream layout (transformers' `model.vision_tower.*`, `model.merger.*`,
`model.language_model.*` names; config.json as `MiniCPMV4_6Config` / `MiniCPMV4_7Config` write it), with the tiny
4.6 / 4.7 tokenizer and processor files (ids the tokenizer lacks decode to ""). For speed and memory, not answers.

The two share one layout (4.7 differs only in its canvas-position token ids), so one builder makes both. Shapes:
- text (`qwen3_5_text`): from the published MiniCPM-V 4.6 config: hidden 1024, head_dim 256, intermediate 3584,
  `full_attention_interval` 4 (layers 3, 7, ... full attention, the rest gated delta-net), `attn_output_gate`,
  tied embeddings. Assumed from Qwen/Qwen3.5-0.8B (public descriptions, not a checkpoint read here): 24 layers,
  8 attention heads / 2 KV heads, linear attention 16 key and 16 value heads of dim 128, conv kernel 4, vocab
  248320, M-RoPE theta 1e7 on a quarter of head_dim (sections [11, 11, 10], interleaved), 262144 positions.
- vision: SigLIP-400M-shaped as in the 4.6 config (hidden 1152, 27 layers, 16 heads, intermediate 4304, patch 14,
  980 px position table), then transformers' minicpmv4_7 defaults for the rest: window-attention merger after
  layer 6 with a 2x2 window, MLP merger 2x2 once, "16x" downsampling.
1.30 B parameters (tied head counted once): 0.75 B text, 0.52 B vision, 0.03 B merger; 2.6 GB in bfloat16.

Weights: normal with std 0.02 (`minicpm.random_shards`); Qwen3.5's RMSNorm scales by (1 + weight) so its weights
are 0, every other norm scale 1, biases and the delta-net's A_log / dt_bias 0 (decay rate 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PretrainedConfig

from minicpm.random_shards import SHARD_BYTES, TensorPlan, numel, write_sharded

TEXT = {"model_type": "qwen3_5_text", "hidden_size": 1024, "intermediate_size": 3584, "num_hidden_layers": 24,
        "full_attention_interval": 4, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
        "attn_output_gate": True, "vocab_size": 248320, "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "max_position_embeddings": 262144, "tie_word_embeddings": True, "attention_bias": False,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_value_head_dim": 128,
        "linear_num_key_heads": 16, "linear_num_value_heads": 16}
VISION = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
          "image_size": 980, "patch_size": 14, "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
          "window_kernel_size": [2, 2]}
TOP = {"insert_layer_id": 6, "image_size": 448, "downsample_mode": "16x", "merge_kernel_size": [2, 2],
       "merger_times": 1, "tie_word_embeddings": True, "dtype": "bfloat16"}
ZERO_CENTRED_NORMS = ("Qwen3_5RMSNorm",)  # scale = 1 + weight


def sections(scale: dict | None = None) -> tuple[dict, dict, dict]:
    """(text, vision, top-level) config sections; `scale` overrides text keys (vision keys under "vision",
    top-level keys under "top") for scaled-down test variants."""
    scale = dict(scale or {})
    vision = {**VISION, **scale.pop("vision", {})}
    top = {**TOP, **scale.pop("top", {})}
    return {**TEXT, **scale}, vision, top  # layer_types: derived from full_attention_interval by the config class


def tensor_plan(config: PretrainedConfig) -> dict[str, TensorPlan]:
    """Every tensor the checkpoint holds, in the model's order (shapes from transformers' class on the meta device;
    a tied head is not stored), with its fill."""
    from minicpm.v4_6 import HYBRID_MODEL_TYPES  # noqa: PLC0415 (v4_6 imports the tiny module lazily)

    with torch.device("meta"):
        model = HYBRID_MODEL_TYPES[config.model_type].model_class(config)
    kinds = {f"{module_name}.{p}" if module_name else p: type(module).__name__
             for module_name, module in model.named_modules() for p, _ in module.named_parameters(recurse=False)}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plan = {}
    for name, value in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        shape = tuple(value.shape)
        if len(shape) > 1:
            fill = None
        elif name.endswith(".weight") and "norm" in kinds.get(name, "").lower():
            fill = 0.0 if kinds[name] in ZERO_CENTRED_NORMS else 1.0
        else:
            fill = 0.0  # biases, A_log, dt_bias
        plan[name] = TensorPlan(shape, fill)
    return plan


def hybrid_config(model_type: str, scale: dict | None = None) -> PretrainedConfig:
    """The transformers config of the full-size shapes (token ids unset: they come from the tokenizer on build)."""
    from minicpm.v4_6 import HYBRID_MODEL_TYPES  # noqa: PLC0415

    text, vision, top = sections(scale)
    return HYBRID_MODEL_TYPES[model_type].config_class(text_config=text, vision_config=vision, **top)


def parameter_count(model_type: str = "minicpmv4_7", scale: dict | None = None) -> int:
    """Parameters stored in the checkpoint (a tied head once)."""
    return sum(numel(p.shape) for p in tensor_plan(hybrid_config(model_type, scale)).values())


def build(model_type: str, out_dir: str | os.PathLike, seed: int = 0, scale: dict | None = None,
          shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write the full-size 4.6 / 4.7 checkpoint (`model_type` minicpmv4_6 / minicpmv4_7) into `out_dir`."""
    from minicpm.v4_6 import HYBRID_MODEL_TYPES, write_checkpoint_files  # noqa: PLC0415

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text, vision, top = sections(scale)
    config = write_checkpoint_files(HYBRID_MODEL_TYPES[model_type], out, text, vision, top)
    write_sharded(tensor_plan(config), out, seed, shard_bytes=shard_bytes, progress=progress)
    return out
