"""`QuantRecord`: the format-neutral int4 / int8 weights of one layer, and their safetensors file.

One file holds every record of a model: tensors `<name>.codes`, `<name>.scales`, `<name>.zeros` and,
when present, `<name>.input_scale`; the metadata holds the QuantConfig and each record's bits, group
size and symmetry as JSON. Loading returns bit-identical tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minicpm.errors import UserError
from quant.codes import dequantize_groups, quantize_int8_rows
from quant.config import QuantConfig

FORMAT = "minicpm-mobile-quant-records"
VERSION = 1
FIELDS = ("codes", "scales", "zeros", "input_scale")


@dataclass
class QuantRecord:
    """Integer weights of one Linear (or embedding table), by its qualified module name.

    codes   uint8 [out, in]: unsigned codes, 0..15 for int4 (0..255 for int8). Symmetric records store
            q + 8 (q in -8..7) with zero point 8, so every consumer uses the same formula.
    scales  float16 [out, in / group_size]
    zeros   uint8 [out, in / group_size]: the zero point per group (8 for symmetric int4, 128 for int8)
    group_size: input channels per group (int8 per-channel records: group_size = in)
    input_scale: float16 [in] or None: a per-channel multiplier on the layer's input, present when no
            preceding op could absorb the AWQ scale (e.g. GELU before fc2).

    The layer computes y = (x * input_scale) @ w.T + b with w = (codes - zeros) * scales (the bias stays
    in the model's own weights, unchanged).
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int
    bits: int
    symmetric: bool
    input_scale: torch.Tensor | None = None

    @classmethod
    def int8_rows(cls, weight: torch.Tensor) -> QuantRecord:
        """The symmetric per-output-channel int8 record of an [out, in] weight (quantize_int8_rows), as the int8
        head and int8 vision take it."""
        q, scale, zero = quantize_int8_rows(weight)
        return cls(q.to(torch.uint8), scale.half(), zero.to(torch.uint8), group_size=weight.shape[1], bits=8,
                   symmetric=True)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(codes - zeros) * scales as an [out, in] weight; exact in float32."""
        return dequantize_groups(self.codes, self.scales, self.zeros).to(dtype)

    def check(self, name: str) -> None:
        """Raise UserError when shapes, dtypes or code ranges are inconsistent (e.g. a damaged file)."""
        out_features, in_features = self.codes.shape if self.codes.ndim == 2 else (0, 0)
        problems = []
        if self.codes.dtype != torch.uint8 or self.codes.ndim != 2:
            problems.append(f"codes must be a 2-D uint8 tensor, got {self.codes.dtype} {list(self.codes.shape)}")
        elif self.group_size < 1 or in_features % self.group_size:
            problems.append(f"in_features {in_features} is not a multiple of group_size {self.group_size}")
        else:
            groups = (out_features, in_features // self.group_size)
            if self.scales.dtype != torch.float16 or tuple(self.scales.shape) != groups:
                problems.append(f"scales must be float16 {list(groups)}, got {self.scales.dtype} "
                                f"{list(self.scales.shape)}")
            if self.zeros.dtype != torch.uint8 or tuple(self.zeros.shape) != groups:
                problems.append(f"zeros must be uint8 {list(groups)}, got {self.zeros.dtype} {list(self.zeros.shape)}")
        if self.bits not in (4, 8):
            problems.append(f"bits must be 4 or 8, got {self.bits}")
        elif not problems:
            top = (1 << self.bits) - 1
            if int(self.codes.max()) > top or int(self.zeros.max()) > top:
                problems.append(f"codes or zeros above {top} for {self.bits}-bit")
        if self.input_scale is not None and (self.input_scale.dtype != torch.float16
                                             or tuple(self.input_scale.shape) != (in_features,)):
            problems.append(f"input_scale must be float16 [{in_features}], got {self.input_scale.dtype} "
                            f"{list(self.input_scale.shape)}")
        if problems:
            raise UserError(f"quantisation record {name}: " + "; ".join(problems))

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        out = {f"{name}.codes": self.codes, f"{name}.scales": self.scales, f"{name}.zeros": self.zeros}
        if self.input_scale is not None:
            out[f"{name}.input_scale"] = self.input_scale
        # safetensors refuses tensors sharing storage (tied weights give identical records): own copies.
        return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}

    def header(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "input_scale": self.input_scale is not None}


def default_mode(directory: bool = False) -> int:
    """Permissions a normal file (or directory) gets under the current umask; safetensors and mkdtemp
    create private 0600 / 0700 ones, which would make shared outputs unreadable to others."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def save_records(path: str | os.PathLike, records: dict[str, QuantRecord], config: QuantConfig) -> Path:
    """Write all records into one safetensors file, atomically (temporary file + rename)."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for name, record in records.items():
        record.check(name)
        tensors.update(record.tensors(name))
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "config": json.dumps(config.to_dict()),
        "records": json.dumps({name: r.header() for name, r in records.items()}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_records(path: str | os.PathLike) -> tuple[dict[str, QuantRecord], QuantConfig]:
    """Read a file written by `save_records`: (records by name, the config they were made with)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"quantisation records not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as e:  # noqa: BLE001 (any unreadable file gets one line naming it)
        raise UserError(f"{path}: cannot read safetensors ({e})") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: not a quantisation records file (format {metadata.get('format')!r})")
    if int(metadata.get("version", 0)) > VERSION:
        raise UserError(f"{path}: records format version {metadata['version']} is newer than this code ({VERSION})")
    config = QuantConfig.from_dict(json.loads(metadata["config"]))
    records = {}
    for name, header in json.loads(metadata["records"]).items():
        try:
            record = QuantRecord(
                codes=tensors[f"{name}.codes"], scales=tensors[f"{name}.scales"], zeros=tensors[f"{name}.zeros"],
                group_size=int(header["group_size"]), bits=int(header["bits"]), symmetric=bool(header["symmetric"]),
                input_scale=tensors[f"{name}.input_scale"] if header["input_scale"] else None)
        except KeyError as e:
            raise UserError(f"{path}: record {name} lacks tensor {e}") from None
        record.check(name)
        records[name] = record
    return records, config
