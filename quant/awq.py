"""`python -m quant.awq`: quantise a MiniCPM-V / MiniCPM-o checkpoint to int4 and write a checkpoint directory.

    python -m quant.awq --model tiny-minicpm-v-4 --out /tmp/v4-awq [--calib data.jsonl] [--group-size 128]
        [--symmetric] [--method awq|rtn] [--samples 128] [--seq-len 512] [--quantize-vision] [--quantize-audio]

The output directory holds the source's config and tokenizer files, model.safetensors (full precision
after AWQ folding, quantised weights dequantised), quant_records.safetensors (the int4 / int8 records)
and quant_config.json. It is written to a temporary directory first and renamed into place.

`--quantize-audio` (MiniCPM-o) also quantises the Whisper audio encoder's blocks (`apm.layers.*`: q/k/v/out_proj,
fc1, fc2; the audio projection into the LLM stays float), AWQ-calibrated on built-in speech-like clips; the
exporters then write those records in the audio graph too.
"""

from __future__ import annotations

import argparse
import time

from minicpm.errors import UserError
from quant.calibration import build_calibration
from quant.checkpoint import check_out_dir, open_checkpoint, write_quantized
from quant.cli import add_quant_arguments, config_from_args, peak_rss_mb, table
from quant.quantize import awq_quantize, rtn_quantize
from runtime.cli import add_model_argument, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m quant.awq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_argument(parser)
    parser.add_argument("--out", required=True, help="output checkpoint directory")
    parser.add_argument("--method", choices=("awq", "rtn"), default="awq")
    parser.add_argument("--calib", help="calibration JSONL (default: the built-in offline set)")
    parser.add_argument("--quantize-vision", action="store_true", help="also quantise the vision encoder")
    parser.add_argument("--quantize-audio", action="store_true",
                        help="also quantise the Whisper audio encoder's blocks (MiniCPM-o)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_quant_arguments(parser)
    args = parser.parse_args(argv)
    if args.method == "rtn" and args.calib:
        raise UserError("--calib is used by --method awq only (RTN needs no calibration)")
    config = config_from_args(args, args.quantize_vision, args.quantize_audio)
    out = check_out_dir(args.out, args.overwrite)
    start = time.perf_counter()
    ckpt = open_checkpoint(args.model)  # MiniCPM-V 4.6 / 4.7: transformers' classes (minicpm.v4_6)
    if args.quantize_audio and getattr(ckpt.config, "audio", None) is None:
        raise UserError(f"--quantize-audio: {args.model} has no audio encoder (MiniCPM-o only)")
    model, _ = ckpt.load_model(args.dtype)
    if args.method == "awq":
        calibration = build_calibration(ckpt, model, args.calib, args.samples, args.seq_len,
                                        vision=args.quantize_vision, audio=args.quantize_audio)
        result = awq_quantize(model, calibration, config)
    else:
        result = rtn_quantize(model, config)
    info = {"source": args.model, "calibration": args.calib or "built-in", "samples": args.samples,
            "seq_len": args.seq_len}
    write_quantized(result, ckpt.path, out, info, overwrite=args.overwrite)
    elapsed = time.perf_counter() - start
    s = result.summary()
    scheme = f"int4 g{config.group_size} {'symmetric' if config.symmetric else 'asymmetric'}"
    print(f"{args.model} -> {out} ({args.method}, {scheme})")
    audio = sum(1 for n in result.report.get("layers", {}) if n.startswith("apm."))
    print(table(["", "value"], [
        ["layers quantised (int4)", s["int4_layers"]],
        *([["  of which in the audio encoder", audio]] if args.quantize_audio else []),
        ["layers quantised (int8)", s["int8_layers"]],
        ["layers kept in full precision", s["kept_layers"]],
        ["mean relative weight error", s["mean_weight_error"]],
        ["mean relative output error (calibration)", s["mean_output_error"]],
        ["time (s)", round(elapsed, 1)],
        ["peak RSS (MiB)", round(peak_rss_mb())],
    ]))
    return 0


if __name__ == "__main__":
    run(main)
