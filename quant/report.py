"""`python -m quant.report`: how much int4 costs, AWQ and RTN side by side, on held-out prompts and images.

    python -m quant.report --model tiny-minicpm-v-4 [--quant awq,rtn] [--samples 128] [--heldout 8]

Per layer: relative weight error ||W_q - W|| / ||W|| and relative output error ||x W_q^T - x W^T|| / ||x W^T||
on the layer's full-precision inputs from held-out samples (W_q in the original model's coordinates, i.e.
with AWQ's folded scales undone). End to end: the mean KL(p_fp || p_q) of the next-token distributions at
every held-out position, and how often the two models' top-1 tokens agree.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn

from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from quant.calibration import build_calibration
from quant.cli import add_quant_arguments, config_from_args, peak_rss_mb, table
from quant.config import QuantConfig
from quant.quantize import QuantResult, awq_quantize, rtn_quantize
from runtime.cli import add_model_argument, run

METHODS = ("awq", "rtn")
ROWS_PER_LAYER = 256  # held-out input rows kept per layer for the output error


@torch.no_grad()
def layer_inputs(model: MiniCPMV, items: list[dict], names: list[str]) -> dict[str, torch.Tensor]:
    """A subsample of each named Linear's full-precision inputs over the held-out samples."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    per_sample = max(1, ROWS_PER_LAYER // len(items))

    def hook(name):
        def record(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            rows[name].append(x[:: max(1, x.shape[0] // per_sample)][:per_sample].cpu())
        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        for item in items:
            model.llm(**item)
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(r) for n, r in rows.items() if r}


@torch.no_grad()
def next_token_agreement(reference: MiniCPMV, quantized: MiniCPMV, items: list[dict]) -> dict:
    """Mean KL(p_fp || p_q) over all held-out positions, and the top-1 agreement rate."""
    kl_sum, agree, positions = 0.0, 0, 0
    for item in items:
        log_p = torch.log_softmax(reference.llm(**item).logits[0].float(), -1)
        log_q = torch.log_softmax(quantized.llm(**item).logits[0].float(), -1)
        kl_sum += float((log_p.exp() * (log_p - log_q)).sum())
        agree += int((log_p.argmax(-1) == log_q.argmax(-1)).sum())
        positions += log_p.shape[0]
    return {"kl": kl_sum / positions, "top1_agreement": agree / positions, "positions": positions}


def layer_errors(result: QuantResult, reference: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, dict]:
    out = {}
    for name, record in result.records.items():
        if record.bits != 4:
            continue
        w = reference.get_submodule(name).weight.detach().float().cpu()
        w_q = result.effective_weight(name)
        x = inputs.get(name)
        out[name] = {
            "weight_error": float((w_q - w).norm() / w.norm()),
            "output_error": float((x @ (w_q - w).T).norm() / (x @ w.T).norm()) if x is not None else None,
        }
    return out


def compare(ckpt: Checkpoint, methods: list[str], config: QuantConfig, samples: int, heldout: int,
            seq_len: int, dtype: str = "auto") -> dict:
    """Quantise a fresh copy of the model per method and measure it against full precision."""
    reference, _ = ckpt.load_model(dtype)
    held = build_calibration(ckpt, reference, samples=heldout, seq_len=seq_len, heldout=True)
    calibration = build_calibration(ckpt, reference, samples=samples, seq_len=seq_len) if "awq" in methods else []
    results: dict[str, dict] = {}
    inputs = None
    for method in methods:
        model, _ = ckpt.load_model(dtype)
        start = time.perf_counter()
        result = awq_quantize(model, calibration, config) if method == "awq" else rtn_quantize(model, config)
        seconds = time.perf_counter() - start
        if inputs is None:
            names = [n for n, r in result.records.items() if r.bits == 4]
            inputs = layer_inputs(reference, held, names)
        layers = layer_errors(result, reference, inputs)
        results[method] = {"seconds": round(seconds, 2), "layers": layers,
                           **next_token_agreement(reference, model, held)}
        del model, result
    return {"model": str(ckpt.path), "heldout_samples": heldout, "calibration_samples": samples,
            "config": config.to_dict(), "methods": results, "peak_rss_mb": round(peak_rss_mb())}


def render(report: dict) -> str:
    methods = list(report["methods"])
    rows = []
    for m in methods:
        r = report["methods"][m]
        w = [v["weight_error"] for v in r["layers"].values()]
        o = [v["output_error"] for v in r["layers"].values() if v["output_error"] is not None]
        rows.append([m, sum(w) / len(w), sum(o) / len(o) if o else None, r["kl"], f"{100 * r['top1_agreement']:.1f}%",
                     r["seconds"]])
    first = report["methods"][methods[0]]
    lines = [f"{report['model']}: {len(first['layers'])} int4 layers, {report['heldout_samples']} held-out samples "
             f"({first['positions']} positions), peak RSS {report['peak_rss_mb']} MiB", "",
             table(["method", "weight err", "output err", "KL(fp||q)", "top-1 agree", "time (s)"], rows), "",
             "per layer (relative errors on held-out inputs)"]
    headers = ["layer"] + [f"{m} {k}" for m in methods for k in ("weight", "output")]
    layer_rows = [[name] + [report["methods"][m]["layers"][name][k] for m in methods
                            for k in ("weight_error", "output_error")] for name in first["layers"]]
    lines.append(table(headers, layer_rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--quant", default="awq,rtn", help="comma-separated methods to compare (awq, rtn)")
    parser.add_argument("--heldout", type=int, default=8, help="held-out samples for the comparison")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    add_quant_arguments(parser)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.quant.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise UserError(f"--quant takes a comma-separated list of {', '.join(METHODS)}, got {args.quant!r}")
    if args.heldout < 1:
        raise UserError(f"--heldout must be >= 1, got {args.heldout}")
    config = config_from_args(args)
    report = compare(Checkpoint.open(args.model), methods, config, args.samples, args.heldout, args.seq_len,
                     args.dtype)
    print(json.dumps(report) if args.json else render(report))
    return 0


if __name__ == "__main__":
    run(main)
