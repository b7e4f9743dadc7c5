"""Checkpoint directories: config.json (wrong types, missing and extra keys) and model.safetensors headers
(truncated, wrong dtypes, lying offsets and lengths, huge header sizes), opened and loaded strictly."""

from __future__ import annotations

import functools
import json
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from tests.fuzz import Target
from tests.fuzz.manifests import json_values

DTYPES = ["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "F8_E4M3", "XX", "", 7]


@functools.cache
def tiny() -> Path:
    from minicpm.tiny import ensure_tiny  # noqa: PLC0415

    return ensure_tiny("tiny-minicpm-v-4")


@functools.cache
def case_dir() -> Path:
    dst = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-"))
    for p in tiny().iterdir():
        shutil.copy(p, dst / p.name)
    return dst


@st.composite
def config_json(draw) -> tuple[str, bytes]:
    config = json.loads((tiny() / "config.json").read_text())
    section = config
    if draw(st.booleans()):
        section = config[draw(st.sampled_from([k for k, v in config.items() if isinstance(v, dict)]))]
    key = draw(st.sampled_from(sorted(section)))
    kind = draw(st.sampled_from(["replace", "delete", "add"]))
    if kind == "replace":
        section[key] = draw(json_values)
    elif kind == "delete":
        del section[key]
    else:
        section[draw(st.text(max_size=12))] = draw(json_values)
    return "config.json", json.dumps(config).encode()


@st.composite
def safetensors_file(draw) -> tuple[str, bytes]:
    data = (tiny() / "model.safetensors").read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header, body = json.loads(data[8:8 + size]), data[8 + size:]
    kind = draw(st.sampled_from(["truncate", "dtype", "offsets", "shape", "header-size", "drop", "bytes"]))
    name = draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    if kind == "truncate":
        return "model.safetensors", data[:draw(st.integers(0, len(data) - 1))]
    if kind == "header-size":
        return "model.safetensors", struct.pack("<Q", draw(st.sampled_from([0, 1, 2**40, 2**63, size + 1]))) \
            + data[8:]
    if kind == "bytes":
        mutable = bytearray(data)
        at = draw(st.integers(0, min(len(mutable), 8 + size) - 1))
        mutable[at] = draw(st.integers(0, 255))
        return "model.safetensors", bytes(mutable)
    if kind == "dtype":
        header[name]["dtype"] = draw(st.sampled_from(DTYPES))
    elif kind == "offsets":
        header[name]["data_offsets"] = draw(st.lists(st.integers(-5, 2**62), min_size=0, max_size=3))
    elif kind == "shape":
        header[name]["shape"] = draw(st.lists(st.integers(-2, 2**40), max_size=4))
    else:
        del header[name]
    raw = json.dumps(header).encode()
    return "model.safetensors", struct.pack("<Q", len(raw)) + raw + body


def open_and_load(case: tuple[str, bytes]) -> None:
    from minicpm.checkpoint import Checkpoint  # noqa: PLC0415

    name, data = case
    directory = case_dir()
    for f in ("config.json", "model.safetensors"):  # restore the other file from the pristine checkpoint
        if f != name:
            shutil.copy(tiny() / f, directory / f)
    (directory / name).write_bytes(data)
    Checkpoint.open(directory).load_model("float32")


TARGETS = [
    Target("checkpoint-config", config_json, open_and_load),
    Target("checkpoint-safetensors", safetensors_file, open_and_load),
]
