"""How vectors are written: one JSON file per case; large arrays beside it as raw little-endian files.

An array in a case's JSON is `{"array": "<file>.bin", "dtype": "float32"|"int64"|..., "shape": [...]}`, the
file relative to that JSON's folder. Swift's `Vectors.swift` (Tests/MiniCPMKitTests) reads exactly this.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def array_ref(folder: Path, name: str, array) -> dict:
    """Write `array` as `folder/name.bin` and return its JSON reference."""
    a = np.ascontiguousarray(np.asarray(array))
    folder.mkdir(parents=True, exist_ok=True)
    a.astype(a.dtype.newbyteorder("<"), copy=False).tofile(folder / f"{name}.bin")
    return {"array": f"{name}.bin", "dtype": a.dtype.name, "shape": list(a.shape)}


def write_case(folder: Path, name: str, case: dict) -> Path:
    """`folder/name.json`, sorted keys for stable diffs."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(case, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    return path
