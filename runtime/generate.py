"""`python -m runtime.generate`: answer a prompt (with images) and stream the text as it is produced.

`--backend torch` runs the eager PyTorch reference. With `--json`, one JSON object
{"token_ids", "text", "stats"} is printed instead of the streamed text.
"""

from __future__ import annotations

import argparse
import json
import sys

from minicpm.checkpoint import Checkpoint
from minicpm.generation import generate
from runtime.cli import (
    add_model_argument,
    add_prompt_arguments,
    add_sampling_arguments,
    messages_from_args,
    run,
    sampling_from_args,
)

BACKENDS = ("torch",)


def format_stats(stats: dict) -> str:
    return (f"[{stats['prompt_tokens']} prompt tokens, {stats['slices']} slices] "
            f"vision {stats['vision_ms']:.1f} ms ({stats['vision_ms_per_slice']:.1f} ms/slice), "
            f"prefill {stats['prefill_ms']:.1f} ms ({stats['prefill_tok_s']:.1f} tok/s), "
            f"first token {stats['time_to_first_token_ms']:.1f} ms, "
            f"decode {stats['new_tokens']} tokens {stats['decode_ms']:.1f} ms ({stats['decode_tok_s']:.1f} tok/s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__)
    add_model_argument(parser)
    parser.add_argument("--backend", default="torch", choices=BACKENDS)
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (torch backend)")
    add_prompt_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = parser.parse_args(argv)
    sampling = sampling_from_args(args)
    ckpt = Checkpoint.open(args.model)
    messages = messages_from_args(args)
    prompt = ckpt.prompts.build(messages, max_slice_nums=args.max_slice_nums, enable_thinking=args.thinking)
    model, _ = ckpt.load_model(args.dtype)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    result = generate(model, prompt, ckpt.tokenizer, sampling, ckpt.stop_ids, None if args.json else stream)
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "stats": result.stats}))
    else:
        print()
        print(format_stats(result.stats), file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)
