"""A full-size MiniCPM-V 4.0-shaped checkpoint with random weights, built offline in the real upstream layout.

`full-minicpm-v-4`: the V-4.0 shapes (LLM hidden 2560, 32 layers, 32 heads / 2 KV heads, head_dim 80, ffn 10240,
vocab 73448, LongRoPE as the real config; SigLIP-400M vision: hidden 1152, 27 layers, 16 heads, intermediate
4304; resampler with 64 queries; 3.79 B parameters) in bfloat16, sharded like a hub snapshot
(`model-0000i-of-0000n.safetensors` of about 2 GB each plus `model.safetensors.index.json`), with the tiny V-4
tokenizer (ids it lacks decode to ""). It is for measuring speed and memory (`make bench-full`), not for answers.

Built on first use into the cache (`minicpm.tiny.cache_dir()/full`): about 7.1 GB on disk and a few minutes
on 2 cores, with a tqdm progress bar. The writer streams: shapes come from the model built on the meta device,
each shard's safetensors header is written first, then every tensor is drawn (in fixed-size chunks, from a
generator seeded by its name) and written at once, so building never holds more than one chunk of one tensor
(peak RSS about 0.6 GB). Weights are normal with std 0.02 (norms 1, biases 0), which keeps activations finite
in bfloat16 through all 32 layers.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import torch
from tqdm import tqdm

from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV

BUILDER_VERSION = 1  # bump when the layout or the weights change, so caches rebuild
FULL_SIZE_MODELS = ["full-minicpm-v-4"]
SHARD_BYTES = 2 * 10**9  # the hub's usual shard size
CHUNK = 1 << 24  # elements drawn at a time (64 MB of float32)
STD = 0.02
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


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


def _shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor the checkpoint holds (name -> shape), from the model built on the meta device."""
    with torch.device("meta"):
        model = MiniCPMV(MiniCPMConfig.from_dict(cfg))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return "norm" in name or parts[-2].startswith("ln")


def _chunks(name: str, shape: tuple[int, ...], seed: int, dtype: torch.dtype):
    """The tensor's values, flat, CHUNK elements at a time (deterministic: a generator seeded by the name)."""
    n = 1
    for d in shape:
        n *= d
    if name.endswith(".weight") and len(shape) == 1 and _is_norm(name):
        fill = 1.0  # norm scales
    elif len(shape) == 1:
        fill = 0.0  # biases
    else:
        fill = None
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        values = torch.full((size,), fill) if fill is not None else torch.randn(size, generator=gen).mul_(STD)
        yield values.to(dtype)


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = itemsize * (torch.Size(shape).numel())
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _header(names: list[str], shapes: dict, dtype: torch.dtype) -> bytes:
    """A safetensors header (8-byte length + JSON padded to 8 bytes) for the tensors in order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = itemsize * torch.Size(shapes[name]).numel()
        meta[name] = {"dtype": DTYPES[dtype], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_sharded(cfg: dict, out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                  shard_bytes: int = SHARD_BYTES, progress: bool = True) -> list[Path]:
    """Write the weights of `cfg` as sharded safetensors + model.safetensors.index.json into `out`, streaming."""
    shapes = _shapes(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(shapes, itemsize, shard_bytes)
    total = itemsize * sum(torch.Size(s).numel() for s in shapes.values())
    files, weight_map = [], {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress)
    for i, names in enumerate(shards):
        path = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with path.open("wb") as f:
            f.write(_header(names, shapes, dtype))
            for name in names:
                for chunk in _chunks(name, shapes[name], seed, dtype):
                    f.write(chunk.view(torch.uint8).numpy().data)
                    bar.update(chunk.numel() * itemsize)
                weight_map[name] = path.name
        files.append(path)
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files


def build_full_size(name: str, out_dir: str | os.PathLike, seed: int = 0, scale: dict | None = None,
                    shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Write the full-size checkpoint `name` into `out_dir` (created). `scale`/`shard_bytes`: a scaled-down
    variant through the same writer (tests)."""
    from minicpm.tiny import O45_TOKENIZER, _write_tokenizer  # noqa: PLC0415

    if name not in FULL_SIZE_MODELS:
        raise ValueError(f"unknown full-size model {name!r} (known: {', '.join(FULL_SIZE_MODELS)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = full_config(scale)
    _write_tokenizer("mid-minicpm-v-4", out)  # the tiny V-4 tokenizer: its ids are a prefix of the vocabulary
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_sharded(cfg, out, seed, shard_bytes=shard_bytes, progress=progress)
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
    return sum(torch.Size(s).numel() for s in _shapes(cfg or full_config()).values())


def ensure_full_size(name: str) -> Path:
    """The cached full-size checkpoint `name`, built atomically on first use (~7.1 GB, a few minutes)."""
    from minicpm.tiny import build_into, cache_dir  # noqa: PLC0415

    target = cache_dir() / "full" / f"{name}-v{BUILDER_VERSION}"
    if (target / "model.safetensors.index.json").is_file() and (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    need = 2 * parameter_count() + 2**28
    if (free := shutil.disk_usage(target.parent).free) < need:
        raise UserError(f"{name} needs {need / 1e9:.1f} GB on disk in {target.parent}, {free / 1e9:.1f} GB free "
                        "(set MINICPM_CACHE to a larger disk)")
    print(f"building {name} (random weights, {need / 1e9:.1f} GB) into {target}")
    return build_into(target, lambda tmp: build_full_size(name, tmp))


if __name__ == "__main__":  # `python -m minicpm.full_size`: build (or find) the cached checkpoint, print its path
    print(ensure_full_size(FULL_SIZE_MODELS[0]))
