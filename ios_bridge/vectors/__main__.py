"""`python -m ios_bridge.vectors --out DIR [--model M ...] [--image IMG ...] [--prompt TEXT ...]`.

Writes the conformance vectors the Swift package's `swift test` replays (`MINICPM_VECTORS=DIR`): one folder
per family (tokenizer, prompts, images, traces). Given images and prompts are added to every family.
"""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

from runtime.cli import run

DEFAULT_MODELS = ["tiny-minicpm-v-4", "tiny-minicpm-v-4.5", "tiny-minicpm-o-4.5", "tiny-minicpm-o-2.6"]
# Each family module has `write(out: Path, models: list[str], images: list[Path], prompts: list[str]) -> None`.
FAMILIES = ["manifest", "images", "tokenizer", "prompts", "traces"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ios_bridge.vectors", description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", action="append", help=f"models (default: {', '.join(DEFAULT_MODELS)})")
    parser.add_argument("--image", action="append", default=[], help="extra image (repeatable)")
    parser.add_argument("--prompt", action="append", default=[], help="extra prompt (repeatable)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these families")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for family in args.family or FAMILIES:
        module = importlib.import_module(f"ios_bridge.vectors.{family}")
        module.write(out / family, args.model or DEFAULT_MODELS, [Path(p) for p in args.image], args.prompt)
        print(f"vectors: {family} -> {out / family}")
    return 0


if __name__ == "__main__":
    run(main)
