"""`python -m runtime.bench` (`make bench`): speed and memory of the schedule, per model and backend, against the
machine's own limits.

For each model and export (ONNX fp32 / int4, ExecuTorch fp32 / 8da4w, Core AI fp32 / int4, int4 also with an int8
head, ONNX and ExecuTorch also with int8 vision, Core ML int4: an export-only row where Core ML cannot run): export
(timed, with the exporter's peak RSS), then through each backend that runs it (each run in its own
process, so RSS is not shared) answer one image question (MiniCPM-o: image plus `--audio`, the committed speech
clip) for vision ms per slice, audio ms per 1 s chunk, time to first token, decode tok/s and peak RSS, and a
text-only prompt of about `--prefill-tokens` tokens for prefill tok/s. The bytes of weights one decode step reads
come from the export's files (`runtime.bench_machine.bytes_per_token`); the machine's DRAM read bandwidth is
measured in the same run (before and after, best kept), giving the roofline (bandwidth / bytes per token) and the
% of it each decode reached, and a device estimate: decode tok/s on A17 Pro, A18 Pro, M1 and M4 at their
bandwidths and the efficiency measured here.

`--llama-bench BIN --gguf FILE` adds llama.cpp's own `llama-bench` on a GGUF of the same weights (e.g. the model's
Q4_0) at the same prompt length, new tokens and threads, measured in the same run: the row our decode and prefill
are compared with (the project builds neither llama.cpp nor the GGUF).

MiniCPM-V 4.6 / 4.7 (the hybrid-attention models, tiny ones in the default set) run only the exports in
HYBRID_EXPORTS (ONNX and ExecuTorch, float and int4, with an int8 head, ONNX with int8 vision): the other requested
exports (Core ML, Core AI: run by their tests) are skipped for them.

`--full-size` adds `full-minicpm-v-4` (3.79 B parameters, random weights, built on first use: ~7.1 GB on disk)
with the device exports (`--full-size-exports`); expect over an hour (each exporter's peak RSS is in its row).
`--hybrid-full` adds `full-minicpm-v-4.7` (the 4.7-1B shapes, 1.30 B parameters, random weights, ~2.6 GB built on
first use) with `--hybrid-full-exports`. Full-size models run through the device backends only (not the eager
torch reference). Rows also carry each artifact's size (`artifact_mb`). A failing step is reported (`failures` in
bench.json, exit code 1) without losing the other jobs' rows; `--reuse-exports` measures the export directories
already in --out (no export time or RSS then), for re-measuring the 20-minute full-size exports.
Prints the tables and writes `out/bench/bench.json`. Speed goals are judged here, never in unit tests. int4
exports use RTN: the same kernels and sizes as AWQ without the calibration time.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from runtime import bench_machine as machine
from runtime.cli import run

QUESTION = "Describe this image in detail."
# the text-only prefill prompt: this sentence repeated up to about --prefill-tokens tokens
PREFILL_TEXT = ("The quick brown fox jumps over the lazy dog while a red square and a blue circle sit on a wooden "
                "table in the morning light. ")
INT8_VISION_SUFFIX = "-int8vis"  # an export name with int8 vision weights ends so; without it, its float twin
# export name -> (exporter module, its extra arguments, the backends that run it)
EXPORTS = {
    "onnx": ("export.onnx", [], ["torch", "onnxruntime"]),
    "onnx-int4": ("export.onnx", ["--quant", "int4-rtn"], ["onnxruntime"]),
    "executorch": ("export.executorch", [], ["executorch"]),
    "executorch-8da4w": ("export.executorch", ["--quant", "int4-rtn"], ["executorch"]),
    # the device configuration: at 4 bits the float head is most of the bytes read per token
    "onnx-int4-int8head": ("export.onnx", ["--quant", "int4-rtn", "--lm-head", "int8"], ["onnxruntime"]),
    "executorch-8da4w-int8head": ("export.executorch", ["--quant", "int4-rtn", "--lm-head", "int8"], ["executorch"]),
    # the same with int8 vision (MatMulInteger): the vision speed / parity trade (export.onnx --vision-weights)
    "onnx-int4-int8head-int8vis": ("export.onnx", ["--quant", "int4-rtn", "--lm-head", "int8", "--vision-weights",
                                                   "int8"], ["onnxruntime"]),
    "executorch-8da4w-int8head-int8vis": ("export.executorch", ["--quant", "int4-rtn", "--lm-head", "int8",
                                                                "--vision-weights", "int8"], ["executorch"]),
    # Core AI through coreai.runtime (CPU on Linux computes fp16 programs far slower than fp32: bench fp32)
    "coreai": ("export.coreai", ["--quant", "none", "--precision", "fp32"], ["coreai"]),
    "coreai-int4": ("export.coreai", ["--quant", "int4-rtn", "--precision", "fp32"], ["coreai"]),
    "coreai-int4-int8head": ("export.coreai", ["--quant", "int4-rtn", "--lm-head", "int8", "--precision", "fp32"],
                             ["coreai"]),
    # Core ML packages run on Apple platforms only: elsewhere the row is the export's (time, peak RSS, sizes)
    "coreml-int4-int8head": ("export.coreml", ["--quant", "int4-rtn", "--lm-head", "int8"],
                             ["coreml"] if sys.platform == "darwin" else []),
}
DEFAULT_MODELS = "tiny-minicpm-v-4,tiny-minicpm-o-4.5,mid-minicpm-v-4,tiny-minicpm-v-4.6,tiny-minicpm-v-4.7"
FULL_SIZE_MODEL = "full-minicpm-v-4"
FULL_SIZE_EXPORTS = ("onnx-int4-int8head,onnx-int4-int8head-int8vis,executorch-8da4w-int8head,"
                     "executorch-8da4w-int8head-int8vis,coreml-int4-int8head")
# the exports MiniCPM-V 4.6 / 4.7 are benched with: ONNX float and int4, ExecuTorch float and 8da4w
HYBRID_EXPORTS = ["onnx", "onnx-int4", "onnx-int4-int8head", "onnx-int4-int8head-int8vis", "executorch",
                  "executorch-8da4w", "executorch-8da4w-int8head", "executorch-8da4w-int8head-int8vis"]
HYBRID_FULL_MODEL = "full-minicpm-v-4.7"
# the tied 1B head is 1 GB of float32 per token: the int8 head (its own record; the table stays float) cuts it 4x
HYBRID_FULL_EXPORTS = "onnx,onnx-int4,onnx-int4-int8head,executorch,executorch-8da4w,executorch-8da4w-int8head"
REFERENCE_BACKENDS = {"torch"}  # eager reference runtimes: left out for full-size models (slow, not a device path)


class StepFailed(Exception):
    """One bench step (an export or a run) exited non-zero: its job is reported and the bench goes on."""


def _run(args: list[str], log: Path | None = None) -> tuple[dict, float, float]:
    """`python -m args...` in its own process: (its --json object or {}, seconds, peak RSS MB); its stdout is kept
    in `log` if given."""
    code, out, err, seconds, rss = machine.run_measured([sys.executable, "-m", *args])
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(out)
    if code != 0:
        last = err.strip().splitlines()[-1] if err.strip() else f"exit code {code}"
        raise StepFailed(f"{' '.join(args)}\n{last}")
    return (json.loads(out.strip().splitlines()[-1]) if "--json" in args else {}), seconds, rss


def prefill_prompt(export_dir: Path, tokens: int) -> str:
    """PREFILL_TEXT repeated and cut to about `tokens` tokens of the export's tokenizer (the chat template adds
    a few more)."""
    from minicpm.prompt import load_tokenizer  # noqa: PLC0415

    tok = load_tokenizer(export_dir)
    per = max(len(tok.encode(PREFILL_TEXT, add_special_tokens=False)), 1)
    words = (PREFILL_TEXT * (tokens // per + 2)).split()
    lo, hi = 1, len(words)  # the most words whose encoding stays within `tokens` (minus the template's ~16)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(tok.encode(" ".join(words[:mid]), add_special_tokens=False)) <= max(tokens - 16, 1):
            lo = mid
        else:
            hi = mid - 1
    return " ".join(words[:lo])


def is_hybrid(model: str) -> bool:
    from export.onnx_hybrid import is_hybrid_model  # noqa: PLC0415 (resolves the model: tiny ones build on first use)

    return is_hybrid_model(model)


def plan_jobs(models: list[str], exports: list[str]) -> list[tuple[str, str]]:
    """(model, export) pairs to run: every export for the older models, those in HYBRID_EXPORTS for 4.6 / 4.7."""
    jobs = []
    for model in models:
        allowed = [name for name in exports if name in HYBRID_EXPORTS] if is_hybrid(model) else exports
        if skipped := [name for name in exports if name not in allowed]:
            print(f"{model}: skipping {', '.join(skipped)} (not available for MiniCPM-V 4.6 / 4.7 yet)")
        jobs += [(model, name) for name in allowed]
    return jobs


def artifact_sizes(export_dir: Path, manifest: dict) -> dict[str, float]:
    """MB per manifest artifact: its file plus external data (`llm.onnx.data`), or its directory (Core AI)."""
    sizes = {}
    for key, artifact in manifest["artifacts"].items():
        path = export_dir / artifact["path"]
        files = list(path.rglob("*")) if path.is_dir() else [path, *export_dir.glob(f"{path.name}.*")]
        sizes[key] = round(sum(f.stat().st_size for f in files if f.is_file()) / 2**20, 1)
    return sizes


def bench_export(model: str, name: str, args: argparse.Namespace) -> list[dict]:
    from minicpm.full_size import FULL_SIZE_MODELS  # noqa: PLC0415

    module, extra, backends = EXPORTS[name]
    if model in FULL_SIZE_MODELS:
        backends = [b for b in backends if b not in REFERENCE_BACKENDS]
    export_dir = Path(args.out) / f"{model}-{name}"
    export_s = export_rss = None  # unknown when --reuse-exports measures an earlier export
    if not (args.reuse_exports and (export_dir / "manifest.json").is_file()):
        log = export_dir.parent / f"{export_dir.name}.export.log"  # the exporter's summary: phases, memory, parity
        _, export_s, export_rss = _run([module, "--model", model, "--out", str(export_dir), "--max-context",
                                        str(args.max_context), *extra], log=log)
        export_s, export_rss = round(export_s, 1), round(export_rss, 1)
    size = sum(p.stat().st_size for p in export_dir.rglob("*") if p.is_file())  # directory assets too
    per_token = machine.bytes_per_token(export_dir)
    common = ["--image", args.image, "--prompt", QUESTION, "--max-new-tokens", str(args.new_tokens), "--json"]
    manifest = json.loads((export_dir / "manifest.json").read_text())
    if "audio" in manifest["schedule"]["steps"]:
        common += ["--audio", args.audio]
    prompt = prefill_prompt(export_dir, args.prefill_tokens)
    export_row = {"model": model, "export": name, "export_s": export_s, "export_peak_rss_mb": export_rss,
                  "export_mb": round(size / 2**20, 1), "artifact_mb": artifact_sizes(export_dir, manifest),
                  "bytes_per_token": per_token}
    if not backends:  # nothing here runs this format: the export's own figures
        return [{**export_row, "backend": "-"}]
    rows = []
    for backend in backends:
        generate = ["runtime.generate", "--artifacts", str(export_dir), "--backend", backend]
        answer = _run([*generate, *common])[0]
        stats = answer["stats"]
        text = _run([*generate, "--prompt", prompt, "--max-new-tokens", "2", "--json"])[0]["stats"]
        rows.append({**export_row, "backend": backend, **stats, "answer_ids": answer["token_ids"],
                     "vision_parity": manifest["parity"].get("vision", manifest["parity"].get("vision_encoder")),
                     "prefill_prompt_tokens": text["prompt_tokens"], "prefill_tok_s": text["prefill_tok_s"],
                     "image_prefill_tok_s": stats["prefill_tok_s"]})
    return rows


def llama_cpp_row(binary: str, gguf: str, args: argparse.Namespace) -> dict:
    """llama.cpp's own `llama-bench` on a GGUF of the same weights, at the bench's prompt length, new tokens and
    threads: the row our decode and prefill are compared with in the same run. bytes_per_token is the GGUF's
    tensor bytes (llama-bench's model_size), which counts the token table a step only indexes: a slight
    overstatement (Q4_0 V-4.0: 106 of 1927 MB), so its roofline % reads slightly high."""
    cmd = [binary, "-m", gguf, "-p", str(args.prefill_tokens), "-n", str(args.new_tokens), "-t",
           str(machine.backend_threads()), "-o", "json"]
    try:
        code, out, err, _, rss = machine.run_measured(cmd)
    except OSError as e:  # no such binary, not executable
        raise StepFailed(f"{' '.join(cmd)}\n{e}") from None
    if code != 0:
        raise StepFailed(f"{' '.join(cmd)}\n{(err.strip().splitlines() or [f'exit code {code}'])[-1]}")
    tests = json.loads(out)
    prefill = next(t for t in tests if t["n_prompt"] and not t["n_gen"])
    decode = next(t for t in tests if t["n_gen"] and not t["n_prompt"])
    return {"model": Path(gguf).name, "export": "llama.cpp " + prefill["model_type"].split()[-1],
            "backend": f"llama.cpp {prefill['build_commit']}", "export_s": None, "export_peak_rss_mb": None,
            "export_mb": round(Path(gguf).stat().st_size / 2**20, 1), "bytes_per_token": prefill["model_size"],
            "decode_tok_s": round(decode["avg_ts"], 2), "prefill_tok_s": round(prefill["avg_ts"], 2),
            "prefill_prompt_tokens": prefill["n_prompt"], "peak_rss_mb": round(rss, 1)}


def int8_vision_agreement(rows: list[dict]) -> list[dict]:
    """Each int8-vision row against the float-vision row of the same model, LLM weights and backend: how many of the
    image question's greedy tokens agree (the answer's first tokens up to where they part) and the vision step's
    error against float (the manifest's parity)."""
    out = []
    for r in rows:
        if not r["export"].endswith(INT8_VISION_SUFFIX) or "answer_ids" not in r:
            continue
        twin = (r["model"], r["backend"], r["export"][:-len(INT8_VISION_SUFFIX)])
        base = next((b for b in rows if (b["model"], b["backend"], b["export"]) == twin and "answer_ids" in b), None)
        if base is None:
            continue
        a, b = r["answer_ids"], base["answer_ids"]
        agree = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        out.append({"model": r["model"], "export": r["export"], "backend": r["backend"], "against": base["export"],
                    "tokens_agree": agree, "tokens": max(len(a), len(b)), "identical": a == b,
                    "vision_parity": r.get("vision_parity")})
    return out


def print_tables(rows: list[dict], devices: list[dict], facts: dict, prefill_tokens: int,
                 agreement: list[dict] = ()) -> None:
    print(f"\n{'model':<20}{'export':<27}{'backend':<12}{'export':>8}{'exp RSS':>9}{'size MB':>9}{'MB/tok':>8}"
          f"{'vision/slice':>13}{'TTFT ms':>9}{'audio/chunk':>12}{f'prefill@{prefill_tokens}':>12}"
          f"{'decode t/s':>11}{'roofline':>9}{'RSS MB':>8}")
    for r in rows:
        print(f"{r['model']:<20}{r['export']:<27}{r['backend']:<12}{_cell(r, 'export_s', '.1f', 's'):>8}"
              f"{_cell(r, 'export_peak_rss_mb', '.0f'):>9}{r['export_mb']:>9.1f}"
              f"{_cell(r, 'bytes_per_token', '.1f', scale=1e-6):>8}{_cell(r, 'vision_ms_per_slice', '.1f', 'ms'):>13}"
              f"{_cell(r, 'time_to_first_token_ms', '.0f'):>9}{_cell(r, 'audio_ms_per_chunk', '.1f', 'ms'):>12}"
              f"{_cell(r, 'prefill_tok_s', '.1f'):>12}{_cell(r, 'decode_tok_s', '.1f'):>11}"
              f"{_cell(r, 'roofline_pct', '.2f', '%'):>9}{_cell(r, 'peak_rss_mb', '.0f'):>8}")
    print("\nartifact sizes (MB)")
    for r in {(r["model"], r["export"]): r for r in rows}.values():
        sizes = ", ".join(f"{key} {mb:.1f}" for key, mb in r.get("artifact_mb", {}).items())
        print(f"{r['model']:<20}{r['export']:<27}{sizes}")
    names = list(machine.DEVICES)
    print(f"\ndevice estimate: decode tok/s = device bandwidth / bytes per token x the efficiency measured here\n"
          f"{'model':<20}{'export':<27}{'backend':<12}{'MB/tok':>8}{'effic.':>8}"
          + "".join(f"{f'{n} ({machine.DEVICES[n]:g})':>16}" for n in names))
    for d in devices:
        print(f"{d['model']:<20}{d['export']:<27}{d['backend']:<12}{d['bytes_per_token'] / 1e6:>8.1f}"
              f"{100 * d['efficiency']:>7.2f}%" + "".join(f"{d['predicted_tok_s'][n]:>16.1f}" for n in names))
    if agreement:
        print(f"\nint8 vision against float vision (same LLM weights): greedy tokens of the image question\n"
              f"{'model':<20}{'export':<36}{'backend':<12}{'tokens agree':>14}{'vision max |err|':>18}")
        for a in agreement:
            parity = "-" if a["vision_parity"] is None else f"{a['vision_parity']:.3g}"
            print(f"{a['model']:<20}{a['export']:<36}{a['backend']:<12}{a['tokens_agree']:>7}/{a['tokens']:<6}"
                  f"{parity:>18}")
    bw = facts["dram_read_gbs"]
    print(f"\nmachine: {facts['cpu_model']}, {facts['cores']} cores ({facts['threads_used']} threads used), "
          f"{facts['memory_gb']} GB RAM, {' '.join(facts['isa'])}\n"
          f"DRAM read bandwidth (torch.sum over 1 GiB, {facts['threads_used']} threads, best of 10): {bw:.1f} GB/s "
          f"(before {facts['dram_read_gbs_before']:.1f}, after {facts['dram_read_gbs_after']:.1f}); REFERENCE "
          f"anchor {machine.REFERENCE_BANDWIDTH_GBS} GB/s ({100 * bw / machine.REFERENCE_BANDWIDTH_GBS:.0f} %)")


def _cell(row: dict, key: str, spec: str, unit: str = "", scale: float = 1.0) -> str:
    """One table cell: the value formatted, or "-" where the row has none (an export nothing here runs)."""
    value = row.get(key)
    return "-" if value is None else f"{value * scale:{spec}}{unit}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated; empty for none")
    parser.add_argument("--exports", default=",".join(EXPORTS), help=f"any of {', '.join(EXPORTS)}")
    parser.add_argument("--full-size", action="store_true",
                        help=f"add {FULL_SIZE_MODEL} (3.79 B, ~7.1 GB built on first use) with --full-size-exports")
    parser.add_argument("--full-size-exports", default=FULL_SIZE_EXPORTS)
    parser.add_argument("--hybrid-full", action="store_true",
                        help=f"add {HYBRID_FULL_MODEL} (4.7-1B shapes, 1.30 B, ~2.6 GB built on first use) with "
                             "--hybrid-full-exports")
    parser.add_argument("--hybrid-full-exports", default=HYBRID_FULL_EXPORTS)
    parser.add_argument("--image", default=str(Path(__file__).resolve().parents[1] / "examples" / "house.png"))
    parser.add_argument("--audio", default=str(Path(__file__).resolve().parents[1] / "examples" / "speech.wav"),
                        help="speech clip for MiniCPM-o exports (their audio step)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prefill-tokens", type=int, default=512,
                        help="length of the text-only prompt prefill tok/s is measured on")
    parser.add_argument("--max-context", type=int, default=2048)
    parser.add_argument("--out", default="out/bench")
    parser.add_argument("--llama-bench", metavar="BIN",
                        help="llama.cpp's llama-bench binary: each --gguf is measured with it in the same run")
    parser.add_argument("--gguf", action="append", default=[],
                        help="a GGUF of the same weights (repeatable), e.g. the model's Q4_0, for --llama-bench")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="measure the export directories already in --out instead of exporting again (the "
                             "rows then have no export time or export RSS)")
    args = parser.parse_args(argv)
    exports, full_exports = args.exports.split(","), args.full_size_exports.split(",")
    hybrid_full_exports = args.hybrid_full_exports.split(",")
    if unknown := sorted(set(exports + full_exports + hybrid_full_exports) - set(EXPORTS)):
        parser.error(f"unknown export {unknown[0]} (choose from {', '.join(EXPORTS)})")
    if args.prefill_tokens + 2 > args.max_context:
        parser.error("--prefill-tokens must fit in --max-context")
    if bool(args.llama_bench) != bool(args.gguf):
        parser.error("--llama-bench and --gguf go together")
    jobs = plan_jobs(list(filter(None, args.models.split(","))), exports)
    jobs += [(FULL_SIZE_MODEL, name) for name in full_exports] if args.full_size else []
    jobs += plan_jobs([HYBRID_FULL_MODEL], hybrid_full_exports) if args.hybrid_full else []
    before = machine.dram_read_bandwidth()
    rows, failures = [], []
    for model, name in tqdm(jobs, desc="bench", unit="export"):
        try:
            rows += bench_export(model, name, args)
        except StepFailed as e:  # keep the other jobs' rows: one refusal must not lose an hour of measurements
            failures.append({"model": model, "export": name, "error": str(e)})
            print(f"\n{model} {name}: bench step failed: {e}", file=sys.stderr)
    for gguf in args.gguf:
        try:
            rows.append(llama_cpp_row(args.llama_bench, gguf, args))
        except StepFailed as e:
            failures.append({"model": gguf, "export": "llama.cpp", "error": str(e)})
    after = machine.dram_read_bandwidth()
    facts = {**machine.machine_facts(), "dram_read_gbs": max(before, after), "dram_read_gbs_before": before,
             "dram_read_gbs_after": after, "reference_dram_read_gbs": machine.REFERENCE_BANDWIDTH_GBS,
             "device_bandwidth_gbs": machine.DEVICES}
    rows = [{**r, **machine.roofline(r, facts["dram_read_gbs"])} for r in rows]
    devices = machine.device_estimates(rows, facts["dram_read_gbs"])
    agreement = int8_vision_agreement(rows)
    print_tables(rows, devices, facts, args.prefill_tokens, agreement)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench.json").write_text(json.dumps({"machine": facts, "rows": rows, "device_estimates": devices,
                                                           "int8_vision_agreement": agreement,
                                                           "failures": failures}, indent=2) + "\n")
    for f in failures:
        print(f"FAILED {f['model']} {f['export']}: {f['error'].splitlines()[-1]}")
    return 1 if failures else 0


if __name__ == "__main__":
    run(main)
