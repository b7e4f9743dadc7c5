"""Killed exports leave nothing behind: `--out` is the previous complete export or absent, never a mixture; the
next run removes the temporary siblings a SIGKILL left; two exports to one `--out` at once end with one complete
export. Each exporter is killed while it writes into its staged directory (export/bundle.py staged_directory)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from runtime.manifest import read_manifest
from tests.conftest import ROOT

COMMON = ["--model", "tiny-minicpm-v-4", "--max-context", "64", "--prefill-chunk", "16"]
EXPORTERS = {
    "onnx": ["export.onnx"],
    "executorch": ["export.executorch", "--quant", "none"],
    "coreml": ["export.coreml", "--quant", "none"],
}


def start(exporter: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *EXPORTERS[exporter], *COMMON, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def siblings(out: Path) -> list[str]:
    """Temporary siblings of `out`."""
    return sorted(p.name for p in out.parent.glob(f".{out.name}.*"))


def kill_while_staging(process: subprocess.Popen, out: Path, sig: int, files_in_stage: int) -> None:
    """Send `sig` once its staged directory (named after its pid) holds at least `files_in_stage` entries."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stages = [p for p in out.parent.glob(f".{out.name}.tmp-{process.pid}-*") if p.is_dir()]
        if stages and len(list(stages[0].iterdir())) >= files_in_stage:
            process.send_signal(sig)
            process.wait(timeout=120)
            return
        if process.poll() is not None:
            pytest.fail(f"the export ended before reaching the kill point: {process.stderr.read()[-500:]}")
        time.sleep(0.02)
    pytest.fail("the export never staged its output")


@pytest.fixture(scope="module")
def previous(tmp_path_factory, private_cache):
    """A complete ONNX export: the 'previous export' every kill must leave intact."""
    out = tmp_path_factory.mktemp("kill") / "export"
    process = start("onnx", out)
    assert process.wait(timeout=600) == 0, process.stderr.read()
    return out, (out / "manifest.json").read_bytes()


@pytest.mark.parametrize("exporter, sig, files_in_stage", [
    ("onnx", signal.SIGINT, 1), ("onnx", signal.SIGKILL, 2),
    ("executorch", signal.SIGINT, 0), ("executorch", signal.SIGKILL, 0),
    ("coreml", signal.SIGINT, 0), ("coreml", signal.SIGKILL, 0),
])
def test_a_killed_export_leaves_the_previous_one(previous, exporter, sig, files_in_stage):
    out, manifest = previous
    process = start(exporter, out)
    kill_while_staging(process, out, sig, files_in_stage)
    assert process.returncode != 0
    assert (out / "manifest.json").read_bytes() == manifest
    read_manifest(out)  # every hash still matches: nothing of the killed run got in
    if sig == signal.SIGINT:
        assert siblings(out) == [], "an interrupted export removes its own staged directory"
    else:
        assert any(".tmp-" in s for s in siblings(out)), "SIGKILL cannot clean up: the next run must"


def test_a_killed_first_export_leaves_nothing(tmp_path, private_cache):
    out = tmp_path / "fresh"
    process = start("onnx", out)
    kill_while_staging(process, out, signal.SIGKILL, 1)
    assert not out.exists()


def test_the_next_run_removes_stale_siblings_and_concurrent_exports_end_whole(previous):
    """Runs after the SIGKILL cases: two exports at once to the same --out, both succeed, one whole export
    remains (hashes verify) and no staged or old directory is left, the killed runs' included."""
    out, _ = previous
    first, second = start("onnx", out), start("onnx", out)
    assert first.wait(timeout=600) == 0, first.stderr.read()
    assert second.wait(timeout=600) == 0, second.stderr.read()
    read_manifest(out)
    assert siblings(out) == []
