"""`python -m runtime.preprocess`: show how a prompt and its images and audio become model inputs.

Prints slice grids, resized sizes, patch grids, audio lengths (seconds, mel frames, 30 s pieces, tokens),
input ids and the placeholder spans (end exclusive).
"""

from __future__ import annotations

import argparse
import json

from minicpm.checkpoint import Checkpoint
from minicpm.video import videos_from_args
from runtime.cli import add_model_argument, add_prompt_arguments, messages_from_args, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.preprocess", description=__doc__)
    add_model_argument(parser)
    add_prompt_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    ckpt = Checkpoint.open(args.model)
    videos = videos_from_args(args)
    prompt = ckpt.prompts.build(messages_from_args(args, videos), max_slice_nums=args.max_slice_nums,
                                enable_thinking=args.thinking)
    result = {
        "images": [im.summary() for im in prompt.images if im.temporal_ids is None],
        "videos": [{k: v.summary()[k] for k in ("seconds", "frames", "groups", "temporal_ids")} for v in videos],
        "input_ids": prompt.input_ids,
        "image_bounds": [list(b) for b in prompt.image_bounds],
        "audio_bounds": [list(b) for b in prompt.audio_bounds],
        "audios": [a.summary() for a in prompt.audios],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"model: {ckpt.config.variant.name} ({ckpt.path})")
    for i, im in enumerate(result["images"]):
        print(f"image {i}: {im['original_size'][0]}x{im['original_size'][1]}, grid {im['grid']}, "
              f"sizes {' '.join(f'{w}x{h}' for w, h in im['slice_sizes'])}")
    for i, v in enumerate(result["videos"]):
        print(f"video {i}: {v['seconds']} s, {v['frames']} frames in {v['groups']} groups, temporal ids "
              f"{v['temporal_ids']}")
    for i, a in enumerate(result["audios"]):
        print(f"audio {i}: {a['seconds']:g} s, {a['mel_frames']} mel frames in {a['chunks']} x 30 s, "
              f"{a['tokens']} tokens")
    audio_spans = f", {len(prompt.audio_bounds)} audio spans" if prompt.audio_bounds else ""
    print(f"{len(prompt.input_ids)} tokens, {len(prompt.image_bounds)} placeholder spans{audio_spans}")
    print(prompt.text)
    return 0


if __name__ == "__main__":
    run(main)
