"""Full-size checkpoints with random weights, built offline in the real upstream layout: for measuring speed and
memory (`make bench-full`), not for answers.

- `full-minicpm-v-4`: the V-4.0 shapes (LLM hidden 2560, 32 layers, 32 heads / 2 KV heads, head_dim 80, ffn 10240,
  vocab 73448, LongRoPE as the real config; SigLIP-400M vision: hidden 1152, 27 layers, 16 heads, intermediate
  4304; resampler with 64 queries; 3.79 B parameters) in bfloat16, with the tiny V-4 tokenizer (ids it lacks
  decode to ""). About 7.1 GB on disk and a few minutes on 2 cores.
- `full-minicpm-v-4.6` / `full-minicpm-v-4.7`: the hybrid 1B shapes, see `minicpm.full_size_hybrid`.

Each is sharded like a hub snapshot (`model-0000i-of-0000n.safetensors` of about 2 GB each plus
`model.safetensors.index.json`) by the streaming writer `minicpm.random_shards` (peak RSS about 0.6 GB), and built
on first use into the cache (`minicpm.tiny.cache_dir()/full`) with a tqdm progress bar. Weights are normal with std
0.02 (norm scales at their identity value, biases 0), which keeps activations finite in bfloat16 through all layers.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.random_shards import SHARD_BYTES, STD, TensorPlan, numel, write_sharded

BUILDER_VERSION = 1  # bump when the layout or the weights change, so caches rebuild
V4_MODEL = "full-minicpm-v-4"
HYBRID_MODELS = {"full-minicpm-v-4.6": "minicpmv4_6", "full-minicpm-v-4.7": "minicpmv4_7"}
FULL_SIZE_MODELS = [V4_MODEL, *HYBRID_MODELS]
__all__ = ["FULL_SIZE_MODELS", "STD", "build_full_size", "ensure_full_size", "full_config", "parameter_count"]


def full_config(scale: dict | None = None) -> dict:
    """config.json of `full-minicpm-v-4`: the tiny V-4 config's upstream keys with the V-4.0 dimensions.
    `scale` overrides LLM keys (and `vision_config` keys under "vision") for scaled-down test variants."""
    from minicpm.tiny import _tiny_configs  # noqa: PLC0415 (tiny imports checkpoint, which imports us lazily)

    scale = dict(scale or {})
    vision = {"hidden_size": 1152, "image_size": 980, "intermediate_size": 4304, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, **scale.pop("vision", {})}
    cfg = {**_tiny_configs()["tiny-minicpm-v-4"], "vocab_size": 73448, "hidden_size": 2560,
           "intermediate_size": 10240, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 2,
           "head_dim": 80, "vision_config": vision, "torch_dtype": "bfloat16", **scale}
    half = cfg["head_dim"] // 2  # LongRoPE: one factor per rotary frequency
    factors = [round(1.0 + 30.0 * (i / max(half - 1, 1)) ** 3, 6) for i in range(half)]
    cfg["rope_scaling"] = {**cfg["rope_scaling"], "long_factor": factors, "short_factor": factors}
    return cfg


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return "norm" in name or parts[-2].startswith("ln")


def tensor_plan(cfg: dict) -> dict[str, TensorPlan]:
    """Every tensor of the V-4 checkpoint (shapes from the model built on the meta device) with its fill: norm
    scales 1, other 1-D tensors (biases) 0, the rest random."""
    with torch.device("meta"):
        model = MiniCPMV(MiniCPMConfig.from_dict(cfg))
    plan = {}
    for name, value in model.state_dict().items():
        shape = tuple(value.shape)
        if name.endswith(".weight") and len(shape) == 1 and _is_norm(name):
            fill = 1.0
        elif len(shape) == 1:
            fill = 0.0
        else:
            fill = None
        plan[name] = TensorPlan(shape, fill)
    return plan


def plan(name: str, scale: dict | None = None) -> dict[str, TensorPlan]:
    """The tensors (shapes and fills) of the full-size checkpoint `name`."""
    if name in HYBRID_MODELS:
        from minicpm import full_size_hybrid  # noqa: PLC0415

        return full_size_hybrid.tensor_plan(full_size_hybrid.hybrid_config(HYBRID_MODELS[name], scale))
    return tensor_plan(full_config(scale))


def build_full_size(name: str, out_dir: str | os.PathLike, seed: int = 0, scale: dict | None = None,
                    shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write the full-size checkpoint `name` into `out_dir` (created). `scale`/`shard_bytes`: a scaled-down
    variant through the same writer (tests)."""
    from minicpm.tiny import O45_TOKENIZER, _write_tokenizer  # noqa: PLC0415

    if name not in FULL_SIZE_MODELS:
        raise ValueError(f"unknown full-size model {name!r} (known: {', '.join(FULL_SIZE_MODELS)})")
    if name in HYBRID_MODELS:
        from minicpm import full_size_hybrid  # noqa: PLC0415

        return full_size_hybrid.build(HYBRID_MODELS[name], out_dir, seed, scale, shard_bytes, progress)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = full_config(scale)
    _write_tokenizer("mid-minicpm-v-4", out)  # the tiny V-4 tokenizer: its ids are a prefix of the vocabulary
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_sharded(tensor_plan(cfg), out, seed, shard_bytes=shard_bytes, progress=progress)
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    tok = PreTrainedTokenizerFast.from_pretrained(str(out))
    eos = [tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "</s>") if t in tok.get_vocab()]
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}, indent=2) + "\n")
    pre = json.loads((O45_TOKENIZER / "preprocessor_config.json").read_text())
    pre = {k: v for k, v in pre.items() if "audio" not in k and "feature_extractor" not in k}
    pre["version"] = cfg["version"]
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2) + "\n")
    return out


def parameter_count(cfg: dict | None = None) -> int:
    """Parameters of the V-4 checkpoint `cfg` (default: the full size)."""
    return sum(numel(p.shape) for p in tensor_plan(cfg or full_config()).values())


def ensure_full_size(name: str) -> Path:
    """The cached full-size checkpoint `name`, built atomically on first use (V-4: ~7.1 GB, 4.6 / 4.7: ~2.6 GB)."""
    from minicpm.tiny import build_into, cache_dir  # noqa: PLC0415

    if name not in FULL_SIZE_MODELS:
        raise ValueError(f"unknown full-size model {name!r} (known: {', '.join(FULL_SIZE_MODELS)})")
    target = cache_dir() / "full" / f"{name}-v{BUILDER_VERSION}"
    if (target / "model.safetensors.index.json").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    count = sum(numel(p.shape) for p in plan(name).values())
    need = 2 * count + 2**28  # bfloat16 weights + tokenizer and slack
    if (free := shutil.disk_usage(target.parent).free) < need:
        raise UserError(f"{name} needs {need / 1e9:.1f} GB on disk in {target.parent}, {free / 1e9:.1f} GB free "
                        "(set MINICPM_CACHE to a larger disk)")
    print(f"building {name} (random weights, {count / 1e9:.2f} B parameters, {need / 1e9:.1f} GB) into {target}")
    return build_into(target, lambda tmp: build_full_size(name, tmp))


if __name__ == "__main__":  # `python -m minicpm.full_size [NAME]`: build (or find) the cached checkpoint
    import sys

    print(ensure_full_size(sys.argv[1] if len(sys.argv) > 1 else V4_MODEL))
