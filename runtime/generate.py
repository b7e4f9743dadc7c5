"""`python -m runtime.generate`: answer a prompt (with images or audio) and stream the text as it is produced.

`--model M --backend torch` runs the eager PyTorch reference on a checkpoint. `--artifacts DIR` runs an
export directory through the device schedule (`runtime.session`) on the runtime of the export's format
(onnxruntime, executorch, coreml, coreai) unless `--backend` names another (torch: the eager modules of the same
split). With `--json`, one JSON object {"token_ids", "text", "stats"}
is printed instead of the streamed text.
"""

from __future__ import annotations

import argparse
import json
import sys

from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.generation import generate
from runtime.backends import BACKENDS
from runtime.cli import (
    add_prompt_arguments,
    add_sampling_arguments,
    messages_from_args,
    require_audio_step,
    run,
    sampling_from_args,
)


def format_stats(stats: dict) -> str:
    return (f"[{stats['prompt_tokens']} prompt tokens, {stats['slices']} slices] "
            + (f"audio {stats['audio_ms']:.1f} ms" + (f" ({stats['audio_ms_per_chunk']:.1f} ms per 1 s chunk)"
                                                      if "audio_ms_per_chunk" in stats else "") + ", "
               if "audio_ms" in stats else "")
            + f"vision {stats['vision_ms']:.1f} ms ({stats['vision_ms_per_slice']:.1f} ms/slice), "
            f"prefill {stats['prefill_ms']:.1f} ms ({stats['prefill_tok_s']:.1f} tok/s), "
            f"first token {stats['time_to_first_token_ms']:.1f} ms, "
            f"decode {stats['new_tokens']} tokens {stats['decode_ms']:.1f} ms ({stats['decode_tok_s']:.1f} tok/s)"
            + (f", peak RSS {stats['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in stats else ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.generate", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="checkpoint: directory, hub id, short name or tiny model (eager reference)")
    source.add_argument("--artifacts", help="export directory with manifest.json")
    parser.add_argument("--backend", choices=BACKENDS,
                        help="torch (default with --model); with --artifacts the export's own runtime (onnx: "
                             "onnxruntime, executorch: executorch, coreml: coreml on macOS, coreai: coreai), or torch")
    parser.add_argument("--dtype", default="auto", help="auto, float32, float16 or bfloat16 (--model only)")
    parser.add_argument("--on-context-full", choices=("error", "stop"),
                        help="when the KV cache is full: fail (default) or end the answer (--artifacts)")
    add_prompt_arguments(parser)
    add_sampling_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    parser.add_argument("--parity", action="store_true",
                        help="also run the eager torch reference of the same weights and print where the greedy "
                             "tokens agree (--artifacts)")
    args = parser.parse_args(argv)
    if args.parity and not args.artifacts:
        raise UserError("--parity compares an export with its eager reference: use it with --artifacts DIR")
    sampling = sampling_from_args(args)
    messages = messages_from_args(args)

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    on_text = None if args.json else stream
    if args.artifacts:
        from runtime.session import Session  # noqa: PLC0415

        session = Session(args.artifacts, args.backend, on_context_full=args.on_context_full)
        if args.audio:
            require_audio_step(session.manifest)
        if args.parity:  # refused before answering, not after
            from runtime.backends import reference_source  # noqa: PLC0415

            if not sampling.greedy:
                raise UserError("--parity compares greedy tokens: drop the sampling flags")
            reference_source(session.manifest)
        result = session.ask(messages, sampling, on_text, args.max_slice_nums, args.thinking)
        if args.parity:
            from runtime.parity import eager_reference, parity_line  # noqa: PLC0415

            expected = eager_reference(session.manifest, messages, sampling, args.max_slice_nums, args.thinking)
            parity = parity_line(session.backend.name, result.token_ids, expected.token_ids)
    else:
        if (args.backend or "torch") != "torch":
            raise UserError("--model runs the eager torch reference; export first and use --artifacts DIR "
                            f"for --backend {args.backend}")
        ckpt = Checkpoint.open(args.model)
        prompt = ckpt.prompts.build(messages, max_slice_nums=args.max_slice_nums, enable_thinking=args.thinking)
        model, _ = ckpt.load_model(args.dtype)
        result = generate(model, prompt, ckpt.tokenizer, sampling, ckpt.stop_ids, on_text)
    if args.json:
        print(json.dumps({"token_ids": result.token_ids, "text": result.text, "stats": result.stats,
                          **({"parity": parity} if args.parity else {})}))
    else:
        print()
        print(format_stats(result.stats), file=sys.stderr)
        if args.parity:
            print(parity)
    return 0


if __name__ == "__main__":
    run(main)
