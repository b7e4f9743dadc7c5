"""Pieces shared by `python -m quant.awq` and `python -m quant.report`: options, config, tables, memory."""

from __future__ import annotations

import argparse
import resource
import sys

from quant.config import QuantConfig


def add_quant_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--group-size", type=int, default=128, help="input channels per int4 group: 32, 64 or 128")
    parser.add_argument("--symmetric", action="store_true", help="no zero points (codes q + 8, zero point 8)")
    parser.add_argument("--samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (at most)")
    parser.add_argument("--lm-head", choices=("keep", "int8"), default="keep", help="output head precision")
    parser.add_argument("--embeddings", choices=("keep", "int8"), default="keep", help="embedding precision")
    parser.add_argument("--no-clip", action="store_true", help="skip AWQ's clip search")
    parser.add_argument("--device", help="calibration device: cuda, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (model weights)")


def config_from_args(args: argparse.Namespace, quantize_vision: bool = False,
                     quantize_audio: bool = False) -> QuantConfig:
    return QuantConfig(group_size=args.group_size, symmetric=args.symmetric, lm_head=args.lm_head,
                       embeddings=args.embeddings, clip_search=not args.no_clip, device=args.device,
                       quantize_vision=quantize_vision, quantize_audio=quantize_audio)


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned text table (left-aligned first column, right-aligned numbers)."""
    cells = [headers] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
