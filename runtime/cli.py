"""Arguments and error handling shared by the runtime command-line tools."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

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
    parser.add_argument("--audio", action="append", default=[],
                        help="audio file: WAV, FLAC, OGG, ... (repeatable, in order; MiniCPM-o)")
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
    """Images first, then videos, then audio clips, then the text, in one user message (as upstream chat() with
    [image, question]). `videos`: already decoded `--video` files (default: decode them here); audio files are
    read by the prompt builder, which knows the model's pooling."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    images = [load_image(path) for path in args.image]
    videos = videos_from_args(args) if videos is None else videos
    audios = [audio_item(path) for path in getattr(args, "audio", [])]
    messages.append({"role": "user", "content": [*images, *(v.content() for v in videos), *audios, args.prompt]})
    return messages


def audio_item(path: str) -> dict:
    """The message item of an audio file (checked to exist now, decoded when the prompt is built)."""
    if not Path(path).is_file():
        raise UserError(f"{path}: no such audio file")
    return {"type": "audio", "audio": path}


def require_audio_step(manifest: dict) -> None:
    """Audio through `--artifacts` needs an export with an audio step (MiniCPM-o): refused in one line otherwise."""
    if "audio" not in manifest["schedule"]["steps"]:
        raise UserError(f"this {manifest['model']['variant']} export has no audio step (audio needs a MiniCPM-o "
                        "export)")


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
