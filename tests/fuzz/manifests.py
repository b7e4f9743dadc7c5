"""manifest.json of a real tiny export: damaged bytes, wrong types, missing and extra keys, hostile paths, huge
values; read as the runtime does (read_manifest, then the Session's own checks on a stand-in backend)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from hypothesis import strategies as st

from tests.fuzz import Target

ROOT = Path(__file__).resolve().parents[2]
HOSTILE_PATHS = ["", ".", "..", "../x", "/etc/passwd", "a/../../b", "a" * 10_000, "x\0y", "llm.onnx/", "~/x",
                 "\\\\server\\share", "vision.onnx\n", "é" * 300, "./././manifest.json", "a/" * 600]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
    | st.sampled_from(HOSTILE_PATHS),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)


@functools.cache
def export_dir() -> Path:
    """A tiny ONNX export (made once per run) whose files every case links to."""
    out = Path(tempfile.mkdtemp(prefix="fuzz-manifest-")) / "export"
    subprocess.run([sys.executable, "-m", "export.onnx", "--model", "tiny-minicpm-v-4", "--out", str(out),
                    "--max-context", "64", "--prefill-chunk", "16"], cwd=ROOT, check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return out


@functools.cache
def case_dir() -> Path:
    """The export's files hard-linked into one directory whose manifest.json each case overwrites."""
    src, dst = export_dir(), Path(tempfile.mkdtemp(prefix="fuzz-case-"))
    for p in src.iterdir():
        if p.name != "manifest.json":
            os.link(p, dst / p.name)
    return dst


def _paths(tree, prefix=()):
    yield prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _paths(v, (*prefix, i))


@st.composite
def manifest_bytes(draw) -> bytes:
    base = json.loads((export_dir() / "manifest.json").read_text())
    kind = draw(st.sampled_from(["bytes", "replace", "delete", "add", "path"]))
    if kind == "bytes":
        data = bytearray(json.dumps(base).encode())
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data) - 1))
            data[at] = draw(st.integers(0, 255))
        return bytes(data)
    paths = list(_paths(base))[1:]
    where = draw(st.sampled_from(paths))
    parent = base
    for key in where[:-1]:
        parent = parent[key]
    if kind == "replace":
        parent[where[-1]] = draw(json_values)
    elif kind == "delete":
        del parent[where[-1]]
    elif kind == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=10))] = draw(json_values)
    else:
        name = draw(st.sampled_from(sorted(base["artifacts"])))
        base["artifacts"][name]["path"] = draw(st.sampled_from(HOSTILE_PATHS) | st.text(max_size=50))
    return json.dumps(base).encode()


class _StandInBackend:
    """The Session's checks without loading graphs (the graphs are not what is fuzzed here)."""

    name = "stand-in"
    owns_cache = True

    def reset(self) -> None:
        pass


def read_as_runtime(data: bytes) -> None:
    from runtime.session import Session  # noqa: PLC0415

    directory = case_dir()
    (directory / "manifest.json").write_bytes(data)
    Session(directory, _StandInBackend())


TARGETS = [Target("manifest", manifest_bytes, read_as_runtime)]
