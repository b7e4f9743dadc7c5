"""Random weights written straight to sharded safetensors, streaming: the writer behind the full-size checkpoints.

A checkpoint is described by a plan, `{name: TensorPlan(shape, fill)}` in file order: `fill` a constant (norm scales,
biases) or None (normal with std STD). `write_sharded` writes each shard's safetensors header first, then draws every
tensor in CHUNK-element pieces from a generator seeded by its name and writes them at once, so building never holds
more than one chunk of one tensor (peak RSS about 0.6 GB whatever the model size). The same plan and seed give the
same bytes. Which tensors a model has, and their fills, is the caller's business (`minicpm.full_size` for V-4.0,
`minicpm.full_size_hybrid` for 4.6 / 4.7).
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

SHARD_BYTES = 2 * 10**9  # the hub's usual shard size
CHUNK = 1 << 24  # elements drawn at a time (64 MB of float32)
STD = 0.02
DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


class TensorPlan(NamedTuple):
    shape: tuple[int, ...]
    fill: float | None  # a constant, or None for normal(0, STD)


def numel(shape: tuple[int, ...]) -> int:
    return torch.Size(shape).numel()


def _chunks(name: str, plan: TensorPlan, seed: int, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """The tensor's values, flat, CHUNK elements at a time (deterministic: a generator seeded by the name)."""
    n = numel(plan.shape)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    for start in range(0, n, CHUNK):
        size = min(CHUNK, n - start)
        if plan.fill is not None:
            values = torch.full((size,), plan.fill)
        else:
            values = torch.randn(size, generator=gen).mul_(STD)
        yield values.to(dtype)


def _plan_shards(plans: dict[str, TensorPlan], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `shard_bytes` (a larger tensor gets a shard of its own)."""
    shards, current, size = [], [], 0
    for name, plan in plans.items():
        nbytes = itemsize * numel(plan.shape)
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _header(names: list[str], plans: dict[str, TensorPlan], dtype: torch.dtype) -> bytes:
    """A safetensors header (8-byte length + JSON padded to 8 bytes) for the tensors in order."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    meta, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        nbytes = itemsize * numel(plans[name].shape)
        meta[name] = {"dtype": DTYPES[dtype], "shape": list(plans[name].shape),
                      "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body


def write_sharded(plans: dict[str, TensorPlan], out: Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                  shard_bytes: int = SHARD_BYTES, progress: bool = True) -> list[Path]:
    """Write `plans` as `model-0000i-of-0000n.safetensors` + model.safetensors.index.json into `out`, streaming."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _plan_shards(plans, itemsize, shard_bytes)
    total = itemsize * sum(numel(p.shape) for p in plans.values())
    files, weight_map = [], {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"writing {out.name}", disable=not progress)
    for i, names in enumerate(shards):
        path = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        with path.open("wb") as f:
            f.write(_header(names, plans, dtype))
            for name in names:
                for chunk in _chunks(name, plans[name], seed, dtype):
                    f.write(chunk.view(torch.uint8).numpy().data)
                    bar.update(chunk.numel() * itemsize)
                weight_map[name] = path.name
        files.append(path)
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return files
