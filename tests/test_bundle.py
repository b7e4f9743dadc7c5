"""`python -m ios_bridge.bundle`: Core ML and Core AI exports as Xcode bundles (verified copy + README.md), and the
refusals (other formats, tampered exports, --out equal to --artifacts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from ios_bridge.bundle import _human, bundle, main
from minicpm.errors import UserError
from runtime.manifest import read_manifest, sha256_tree
from tests.conftest import ROOT, v45_command

EXPORTS_AHEAD = [v45_command(fmt) for fmt in ("coreml", "coreai", "onnx")]  # queued at session start


@pytest.mark.parametrize(("fmt", "os_line", "suffix"), [("coreml", "iOS 18 / iPadOS 18 / macOS 15", ".mlpackage"),
                                                        ("coreai", "iOS 27 / iPadOS 27 / macOS 27", ".aimodel")])
def test_bundle_is_the_verified_export_plus_a_readme(v45_exports, tmp_path, fmt, os_line, suffix):
    export = v45_exports(fmt)
    assert (export / "README.md").read_text().startswith("# minicpm-v-4.5 for ")  # the exporter writes it too
    out = bundle(export, tmp_path / "Bundle")
    manifest = read_manifest(out)  # every sha256 verifies in the copy
    assert manifest == json.loads((export / "manifest.json").read_text())
    listed = {a["path"] for a in manifest["artifacts"].values()} | {f["path"] for f in manifest["files"]}
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json", "README.md"}
    for entry in manifest["artifacts"].values():
        if entry["path"].endswith(suffix):
            assert sha256_tree(out / entry["path"]) == sha256_tree(export / entry["path"])
    text = (out / "README.md").read_text()
    assert f"Minimum OS: {os_line}." in text
    assert "video step: function `video`" in text and "prefill step: function `prefill`" in text
    state = manifest["schedule"][fmt]["state"]
    kv = len(state["names"]) * state["shape"][1] * state["shape"][2] * state["shape"][3]
    kv *= 2 if state["dtype"] == "float16" else 4
    assert f"KV cache {_human(kv)} ({manifest['schedule']['max_context']} tokens" in text  # the state's bytes


def test_bundle_refuses_what_an_app_cannot_take(v45_exports, tmp_path):
    with pytest.raises(UserError, match="this is an onnx export; the Xcode bundle takes Core ML or Core AI"):
        bundle(v45_exports("onnx"), tmp_path / "b")
    with pytest.raises(UserError, match="--out must differ"):
        bundle(v45_exports("coreml"), v45_exports("coreml"))
    tampered = tmp_path / "tampered"
    shutil.copytree(v45_exports("coreml"), tampered)
    table = tampered / "token_embedding.bin"
    data = bytearray(table.read_bytes())
    data[100] ^= 1
    table.write_bytes(data)
    with pytest.raises(UserError, match="sha256"):
        bundle(tampered, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))  # nothing half-written


def test_cli_prints_one_line_and_exits_2_on_bad_input(v45_exports, tmp_path):
    assert main(["--artifacts", str(v45_exports("coreai")), "--out", str(tmp_path / "ok")]) == 0
    r = subprocess.run([sys.executable, "-m", "ios_bridge.bundle", "--artifacts", str(tmp_path / "missing"),
                        "--out", str(tmp_path / "b")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
