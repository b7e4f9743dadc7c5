"""`python -m runtime.bench` (`make bench`): speed and memory of the schedule, per model and backend.

For each model and export (ONNX fp32 / int4, ExecuTorch fp32 / 8da4w, Core AI fp32 / int4, int4 also with an int8
head): export (timed), then answer one image question (MiniCPM-o: image plus `--audio`, the committed speech clip)
through each backend that runs it and record vision ms per slice, audio ms per 1 s chunk, time to first token,
prefill and decode tok/s and peak RSS (each run in its own process, so RSS is not shared).
Prints a table and writes `out/bench/bench.json`. Speed goals are judged here, never in unit tests. int4
exports use RTN: the same kernels and sizes as AWQ without the calibration time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from tqdm import tqdm

from runtime.cli import run

QUESTION = "Describe this image in detail."
# export name -> (exporter module, its extra arguments, the backends that run it)
EXPORTS = {
    "onnx": ("export.onnx", [], ["torch", "onnxruntime"]),
    "onnx-int4": ("export.onnx", ["--quant", "int4-rtn"], ["onnxruntime"]),
    "executorch": ("export.executorch", [], ["executorch"]),
    "executorch-8da4w": ("export.executorch", ["--quant", "int4-rtn"], ["executorch"]),
    # the device configuration: at 4 bits the float head is most of the bytes read per token
    "onnx-int4-int8head": ("export.onnx", ["--quant", "int4-rtn", "--lm-head", "int8"], ["onnxruntime"]),
    "executorch-8da4w-int8head": ("export.executorch", ["--quant", "int4-rtn", "--lm-head", "int8"], ["executorch"]),
    # Core AI through coreai.runtime (CPU on Linux computes fp16 programs far slower than fp32: bench fp32)
    "coreai": ("export.coreai", ["--quant", "none", "--precision", "fp32"], ["coreai"]),
    "coreai-int4": ("export.coreai", ["--quant", "int4-rtn", "--precision", "fp32"], ["coreai"]),
    "coreai-int4-int8head": ("export.coreai", ["--quant", "int4-rtn", "--lm-head", "int8", "--precision", "fp32"],
                             ["coreai"]),
}


def _run(args: list[str]) -> dict:
    r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench step failed: {' '.join(args)}\n{r.stderr.strip().splitlines()[-1]}")
    return json.loads(r.stdout.strip().splitlines()[-1]) if "--json" in args else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny-minicpm-v-4,tiny-minicpm-o-4.5,mid-minicpm-v-4")
    parser.add_argument("--exports", default=",".join(EXPORTS), help=f"any of {', '.join(EXPORTS)}")
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples" / "house.png"))
    parser.add_argument("--audio", default=str(Path(__file__).resolve().parents[1] / "examples" / "speech.wav"),
                        help="speech clip for MiniCPM-o exports (their audio step)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--out", default="out/bench")
    args = parser.parse_args(argv)
    exports = args.exports.split(",")
    if unknown := sorted(set(exports) - set(EXPORTS)):
        parser.error(f"unknown export {unknown[0]} (choose from {', '.join(EXPORTS)})")
    rows = []
    jobs = [(model, name) for model in args.models.split(",") for name in exports]
    for model, name in tqdm(jobs, desc="bench", unit="export"):
        module, extra, backends = EXPORTS[name]
        export_dir = Path(args.out) / f"{model}-{name}"
        t = time.perf_counter()
        _run([module, "--model", model, "--out", str(export_dir), "--max-context", str(args.max_context), *extra])
        export_s = time.perf_counter() - t
        size = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())  # directory assets too
        common = ["--image", args.image, "--prompt", QUESTION, "--max-new-tokens", str(args.new_tokens), "--json"]
        manifest = json.loads((export_dir / "manifest.json").read_text())
        if "audio" in manifest["schedule"]["steps"]:
            common += ["--audio", args.audio]
        for backend in backends:
            stats = _run(["runtime.generate", "--artifacts", str(export_dir), "--backend", backend,
                          *common])["stats"]
            rows.append({"model": model, "export": name, "backend": backend, "export_s": round(export_s, 1),
                         "export_mb": round(size / 2**20, 1), **stats})
    print(f"\n{'model':<18}{'export':<27}{'backend':<13}{'took':>9}{'size MB':>9}{'vision/slice':>14}{'TTFT ms':>9}"
          f"{'audio/chunk':>13}{'prefill t/s':>13}{'decode t/s':>12}{'RSS MB':>8}")
    for r in rows:
        print(f"{r['model']:<18}{r['export']:<27}{r['backend']:<13}{r['export_s']:>8.1f}s{r['export_mb']:>9.1f}"
              f"{r['vision_ms_per_slice']:>12.1f}ms{r['time_to_first_token_ms']:>9.0f}"
              f"{r.get('audio_ms_per_chunk', 0.0):>11.1f}ms{r['prefill_tok_s']:>13.1f}"
              f"{r['decode_tok_s']:>12.1f}{r['peak_rss_mb']:>8.0f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    run(main)
