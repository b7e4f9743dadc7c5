"""Manifest vectors: a real ONNX export of tiny-minicpm-v-4 that Swift's `Manifest.load` must read and verify.

The case JSON records what the Python reader sees (artifact names, steps, the directory digest of the export's
tokenizer files) so the Swift side checks the same facts.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ios_bridge.vectors.common import write_case
from runtime.manifest import read_manifest

MODEL = "tiny-minicpm-v-4"


def write(out: Path, models: list[str], images: list[Path], prompts: list[str]) -> None:
    """Export MODEL to `out/export` (ONNX, context 256) and write `out/export.json` describing it."""
    export = out / "export"
    if export.exists():
        shutil.rmtree(export)
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "export.onnx", "--model", MODEL, "--out", str(export), "--max-context", "256"]
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2])
    manifest = read_manifest(export)
    write_case(out, "export", {
        "model": MODEL,
        "directory": "export",
        "format": manifest["format"],
        "artifacts": sorted(manifest["artifacts"]),
        "steps": {name: spec["artifact"] for name, spec in manifest["schedule"]["steps"].items()},
        "max_context": manifest["schedule"]["max_context"],
        "stop_ids": manifest["tokenizer"]["stop_ids"],
    })
