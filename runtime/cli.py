"""Arguments and error handling shared by the runtime command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from minicpm.errors import UserError
from minicpm.generation import SamplingConfig
from minicpm.image_processing import load_image
from minicpm.video import Video, add_video_arguments, videos_from_args


def run(main: Callable[[list[str] | None], int]) -> None:
    """Call `main`; bad input becomes one line on stderr and exit code 2, never a traceback."""
    try:
        sys.exit(main(None))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="snapshot directory, hub id (openbmb/MiniCPM-V-4), short name (MiniCPM-V-4) "
                             "or tiny model (tiny-minicpm-v-4)")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--image", action="append", default=[], help="image file (repeatable, in order)")
    add_video_arguments(parser)
    parser.add_argument("--prompt", required=True, help="the user's question")
    parser.add_argument("--system", help="system prompt (none unless given)")
    parser.add_argument("--max-slice-nums", type=int, help="cap on slices per image (default: the checkpoint's)")
    parser.add_argument("--thinking", action="store_true", help="enable thinking (Qwen3-based models)")


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--greedy", action="store_true", help="argmax decoding (the default)")
    parser.add_argument("--temperature", type=float, help="sample with this temperature")
    parser.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="HF-style penalty over the generated tokens (1.0 = off)")


def messages_from_args(args: argparse.Namespace, videos: list[Video] | None = None) -> list[dict]:
    """Images first, then videos, then the text, in one user message (as upstream chat() with [image, question]).
    `videos`: already decoded `--video` files (default: decode them here)."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    images = [load_image(path) for path in args.image]
    videos = videos_from_args(args) if videos is None else videos
    messages.append({"role": "user", "content": [*images, *(v.content() for v in videos), args.prompt]})
    return messages


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    sampled = any(v is not None for v in (args.temperature, args.top_p, args.top_k))
    if sampled and args.greedy:
        raise UserError("--greedy cannot be combined with --temperature, --top-p or --top-k")
    return SamplingConfig(
        greedy=not sampled,
        temperature=args.temperature if args.temperature is not None else 1.0,
        top_p=args.top_p if args.top_p is not None else 1.0,
        top_k=args.top_k if args.top_k is not None else 0,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        max_new_tokens=args.max_new_tokens,
    )
