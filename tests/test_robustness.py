"""Hostile export directories as a new user meets them: one `error:` line on stderr and exit code 2, never a
traceback (issue 17's reported symptoms, plus the neighbours of each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from minicpm.errors import UserError
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, private_cache):
    out = tmp_path_factory.mktemp("robust") / "export"
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--model", "tiny-minicpm-v-4", "--out", str(out),
                        "--max-context", "64", "--prefill-chunk", "16"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def copy(export_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(export_dir, dst)
    return dst


def generate(directory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.generate", "--artifacts", str(directory), "--prompt", "Hi",
                           "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line(r: subprocess.CompletedProcess, pattern: str) -> None:
    import re  # noqa: PLC0415

    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_one_damaged_byte_in_the_manifest(copy):
    path = copy / "manifest.json"
    data = bytearray(path.read_bytes())
    data[40] = 0xFF  # not UTF-8: was a UnicodeDecodeError traceback
    path.write_bytes(bytes(data))
    assert_one_line(generate(copy), r"manifest.json: not UTF-8 text \(byte 40")


def test_a_10000_character_artifact_path(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["vision"]["path"] = "a" * 10_000  # was OSError: File name too long
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line(generate(copy), r"is not a valid artifact path")


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must be a JSON object, got list"),
    ("{" * 100_000, "invalid JSON"),
    ('{"schema_version": 1', "invalid JSON"),
])
def test_manifests_that_are_not_objects(copy, text, message):
    (copy / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=message):
        read_manifest(copy)


def test_nul_byte_in_a_path(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][0]["path"] = "config\u0000.json"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a valid artifact path"):
        read_manifest(copy)


def test_embedding_table_that_disagrees_with_the_manifest(copy):
    from runtime.manifest import sha256_file, write_manifest  # noqa: PLC0415

    manifest = json.loads((copy / "manifest.json").read_text())
    table = copy / "token_embedding.bin"
    table.write_bytes(table.read_bytes()[:-4])  # one float short, hash made to match: only the size check can tell
    manifest["artifacts"]["token_embedding"]["sha256"] = sha256_file(table)
    write_manifest(copy, manifest)
    with pytest.raises(UserError, match=r"does not hold the \[\d+, \d+\] float32 table"):
        Session(copy)
    del manifest["artifacts"]["token_embedding"]
    write_manifest(copy, manifest)
    with pytest.raises(UserError, match="lacks a token_embedding artifact"):
        Session(copy)
