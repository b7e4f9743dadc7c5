"""Published AutoAWQ GEMM checkpoints <-> QuantRecords, without re-quantising.

AutoAWQ GEMM layout of one Linear (in -> out, group g):
    qweight  int32 [in, out / 8]   eight 4-bit codes per int32; nibble i (bits 4i..4i+3) of column c holds
                                   output channel 8c + ORDER[i], ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
    qzeros   int32 [in / g, out / 8] zero points, packed the same way
    scales   float16 [in / g, out]
    w[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o]
Our records are [out, in] / [out, in / g]; the import is a transpose plus unpacking, bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open

from minicpm.errors import UserError
from quant.records import QuantRecord

ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # output channel offset stored in nibble i
REVERSE_ORDER = [ORDER.index(i) for i in range(8)]  # nibble holding output channel offset j


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[rows, cols] codes 0..15 (cols divisible by 8) -> int32 [rows, cols / 8] in AutoAWQ nibble order."""
    rows, cols = codes.shape
    if cols % 8:
        raise UserError(f"AutoAWQ packing needs a multiple of 8 output channels, got {cols}")
    c = codes.to(torch.int64).reshape(rows, cols // 8, 8)[:, :, ORDER]  # nibble i <- channel ORDER[i]
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    packed = (c << shifts).sum(-1)  # disjoint bits: the sum is the bitwise or, in 0 .. 2^32 - 1
    return (packed - (packed >= 2**31).to(torch.int64) * 2**32).to(torch.int32)  # as two's complement int32


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int32 [rows, n] in AutoAWQ nibble order -> uint8 codes [rows, 8n]."""
    p = packed.to(torch.int64) & 0xFFFFFFFF  # the unsigned bit pattern
    shifts = torch.arange(0, 32, 4, dtype=torch.int64)
    nibbles = (p[:, :, None] >> shifts) & 0xF  # [rows, n, 8], nibble order
    return nibbles[:, :, REVERSE_ORDER].reshape(packed.shape[0], -1).to(torch.uint8)


def record_from_gemm(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     name: str = "layer") -> QuantRecord:
    """One AutoAWQ GEMM layer -> an asymmetric int4 QuantRecord with the same codes, zeros and scales."""
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise UserError(f"{name}: qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
    groups = qzeros.shape[0]
    if (tuple(qzeros.shape) != (groups, out_features // 8) or tuple(scales.shape) != (groups, out_features)
            or groups == 0 or in_features % groups):
        raise UserError(f"{name}: inconsistent AutoAWQ shapes qweight {list(qweight.shape)}, "
                        f"qzeros {list(qzeros.shape)}, scales {list(scales.shape)}")
    record = QuantRecord(
        codes=unpack_int4(qweight).T.contiguous(),
        scales=scales.to(torch.float16).T.contiguous(),
        zeros=unpack_int4(qzeros).T.contiguous(),
        group_size=in_features // groups, bits=4, symmetric=False)
    record.check(name)
    return record


def gemm_from_record(record: QuantRecord, name: str = "layer") -> dict[str, torch.Tensor]:
    """The inverse: {"qweight", "qzeros", "scales"} in AutoAWQ GEMM layout. Symmetric records pack too
    (their zero point 8 is stored explicitly); an explicit input scale has no AutoAWQ equivalent."""
    if record.bits != 4:
        raise UserError(f"{name}: AutoAWQ GEMM holds 4-bit weights, this record has {record.bits} bits")
    if record.input_scale is not None:
        raise UserError(f"{name}: has an explicit input scale, which AutoAWQ GEMM cannot represent")
    return {"qweight": pack_int4(record.codes.T), "qzeros": pack_int4(record.zeros.T),
            "scales": record.scales.T.contiguous().to(torch.float16)}


def import_autoawq(tensors: dict[str, torch.Tensor]) -> dict[str, QuantRecord]:
    """Records for every `<name>.qweight` in an AutoAWQ state dict (bias and other tensors are ignored)."""
    records = {}
    for key in sorted(tensors):
        if not key.endswith(".qweight"):
            continue
        name = key[: -len(".qweight")]
        try:
            records[name] = record_from_gemm(tensors[key], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"], name)
        except KeyError as e:
            raise UserError(f"{name}: AutoAWQ layer lacks {e}") from None
    return records


def load_autoawq(path: str | os.PathLike) -> dict[str, QuantRecord]:
    """Records from an AutoAWQ checkpoint directory (or one safetensors file), reading only the int4 tensors."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"{path}: no safetensors files")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():  # noqa: SIM118 (safe_open is not a dict)
                    if key.endswith((".qweight", ".qzeros", ".scales")):
                        tensors[key] = sf.get_tensor(key)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"{f}: cannot read safetensors ({e})") from None
    records = import_autoawq(tensors)
    if not records:
        raise UserError(f"{path}: no AutoAWQ layers (no *.qweight tensors)")
    return records
