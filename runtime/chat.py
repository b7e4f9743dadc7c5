"""`python -m runtime.chat --artifacts DIR`: an interactive conversation on an export directory.

Type a message and press enter. `/image PATH` attaches an image to your next message, `/video PATH` a video
(MiniCPM-V 4.5; sampled with --fps / --max-frames / --packing), `/audio PATH` an audio clip (MiniCPM-o, once an
export carries an audio step; `--audio FILE` attaches one to the first message), `/reset` clears the
conversation (and the KV cache), `/quit` or end of input leaves. Follow-up turns reuse the KV cache and
prefill only the new tokens.
"""

from __future__ import annotations

import argparse
import sys

from minicpm.errors import UserError
from minicpm.image_processing import load_image
from minicpm.video import add_video_arguments, load_video
from runtime.backends import BACKENDS
from runtime.cli import add_sampling_arguments, audio_item, require_audio_step, run, sampling_from_args
from runtime.generate import format_stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", required=True, help="export directory with manifest.json")
    parser.add_argument("--backend", choices=BACKENDS, help="default: the runtime of the export's format")
    parser.add_argument("--system", help="system prompt for new conversations")
    parser.add_argument("--thinking", action="store_true", help="enable thinking (Qwen3-based models)")
    parser.add_argument("--stats", action="store_true", help="print timings after each answer")
    add_video_arguments(parser, chat=True)
    parser.add_argument("--audio", action="append", default=[], help="audio file for the first message (MiniCPM-o)")
    add_sampling_arguments(parser)
    args = parser.parse_args(argv)
    sampling = sampling_from_args(args)
    from runtime.session import Session  # noqa: PLC0415

    session = Session(args.artifacts, args.backend)
    if args.audio:
        require_audio_step(session.manifest)
    interactive = sys.stdin.isatty()
    images: list = []
    videos: list = []
    audios: list = [audio_item(path) for path in args.audio]
    first = True
    print(f"{session.manifest['model']['variant']} on {session.backend.name}; /image PATH, /video PATH, /audio PATH, "
          "/reset, /quit", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return 0
        line = line.strip()
        if not line:
            continue
        if line == "/reset":
            session.reset()
            images, videos, audios, first = [], [], [], True
            print("(conversation cleared)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                images.append(load_image(line[len("/image"):].strip()))
                print(f"(image attached: {images[-1].size[0]}x{images[-1].size[1]})", file=sys.stderr)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/video"):
            try:
                videos.append(load_video(line[len("/video"):].strip(), args.fps, args.max_frames, args.packing))
                summary = videos[-1].summary()
                print(f"(video attached: {summary['seconds']} s, {summary['frames']} frames in {summary['groups']} "
                      "groups)", file=sys.stderr)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        if line.startswith("/audio"):
            try:
                require_audio_step(session.manifest)
                audios.append(audio_item(line[len("/audio"):].strip()))
                print(f"(audio attached: {audios[-1]['audio']})", file=sys.stderr)
            except UserError as e:
                print(f"error: {e}", file=sys.stderr)
            continue
        messages = [{"role": "system", "content": args.system}] if args.system and first else []
        messages.append({"role": "user", "content": [*images, *(v.content() for v in videos), *audios, line]})
        try:
            result = session.ask(messages, sampling, lambda piece: print(piece, end="", flush=True),
                                 enable_thinking=args.thinking)
        except UserError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            continue
        print()
        if args.stats:
            print(format_stats(result.stats), file=sys.stderr)
        images, videos, audios, first = [], [], [], False


if __name__ == "__main__":
    run(main)
