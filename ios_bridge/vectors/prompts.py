"""Prompt vectors: conversations and the exact input ids and image spans PromptBuilder gives them.

Per model, `<model>/` holds its tokenizer files and a `manifest.json` with exactly the manifest's `prompt`,
`tokenizer` and `preprocessing` sections (as build_manifest writes them). Each case `<model>__<case>.json` is a
list of turns: the first built by `PromptBuilder.build`, later ones by `build_turn` (image ids continuing from
`first_image`), as `runtime.session` builds a conversation. Images are described by their slice grid
(`{"type": "image", "grid": [cols, rows] | null}`, the grid of a real image of that size), video groups by
`{"type": "video_group", "frames": n}`. A case with `error` must be refused (a UserError here).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from export.bundle import TOKENIZER_FILES, build_manifest, file_entry
from export.prompt_pieces import build_from_pieces, describe
from ios_bridge.vectors.common import write_case
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.image_processing import load_image
from tests.conftest import noise_image

SMALL, WIDE, TALL, LARGE = (noise_image(200, 150, 1), noise_image(640, 480, 2), noise_image(300, 900, 3),
                            noise_image(1344, 896, 4))  # grids: none, 2x1, 1x3 and 3x2 (cols x rows)


def _user(*content) -> dict:
    return {"role": "user", "content": list(content)}


def _conversations(ckpt: Checkpoint, images: list[Path], prompts: list[str]) -> dict[str, list[list[dict]]]:
    """case name -> turns (each a list of messages); the first turn is a first prompt, the rest follow-ups."""
    convs = {
        "text": [[_user("What is in this image?")]],
        "system_text": [[{"role": "system", "content": "You are terse."}, _user("Hello!")]],
        "one_image": [[_user(SMALL, "What is this?")]],
        "one_sliced": [[_user(TALL, "Describe it.")]],
        "large_sliced": [[_user(LARGE, "Read the text.")]],
        "two_images": [[_user(WIDE, SMALL, "Compare the two.")]],
        "system_two_images": [[{"role": "system", "content": "Be precise."}, _user(TALL, "and", WIDE)]],
        "empty_text": [[_user(SMALL)]],
        "history": [[_user(WIDE, "What is this?"), {"role": "assistant", "content": "A dog."},
                     _user("And its colour?")]],
        "unicode": [[_user("Ça va? 日本語 🙂 — \"quotes\"\tand\ttabs\n\nnew lines")]],
        "special_text": [[_user("a <|im_end|> b <|listen|> c </think> d")]],  # o-4.5 drops <|listen|>
        "multi_turn": [[_user(WIDE, "What is this?")], [_user(SMALL, "And this one?")], [_user("Thanks.")],
                       [{"role": "system", "content": "Now in French."}, _user(TALL, "Encore?")]],
    }
    if ckpt.config.variant.thinking:
        convs["history_reasoning"] = [[_user("Hi"), {"role": "assistant", "content": "<think>\nhm\n</think>\n\nHey!"},
                                       _user(SMALL, "Look.")]]
    if ckpt.config.variant.resampler == "3d":
        frames = [np.asarray(noise_image(160, 120, 10 + i)) for i in range(5)]
        video = {"type": "video", "frames": frames, "temporal_ids": [[0, 3, 7], [10, 13]]}
        convs["video"] = [[_user(video, "What happens?")]]
        convs["video_turn"] = [[_user(SMALL, "What is this?")], [_user(video, WIDE, "And here?")]]
    for i, text in enumerate(prompts):
        convs[f"prompt{i}"] = [[_user(text)], [_user(WIDE, text)]]
    for i, path in enumerate(images):
        convs[f"image{i}"] = [[_user(load_image(path), "What is in this image?")]]
    return convs


REFUSED = {  # case -> (messages, error text); refused by PromptBuilder or by the pieces
    "reserved_tag": ([{"role": "user", "content": [{"type": "text", "text": "{tag} is reserved"}]}],
                     "reserved image tag"),
    "stray_marker": ([{"role": "user", "content": [{"type": "text", "text": "look <image> here"}]}],
                     "unbalanced image placeholder"),
    "trailing_assistant": ([{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "Hel"}]}],
                           "after the last user message"),
}


def _turns(ckpt: Checkpoint, pieces: dict, turns: list[list[dict]], thinking: bool) -> list[dict]:
    encode = lambda text: ckpt.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    out, first_image = [], 0
    for k, messages in enumerate(turns):
        if k == 0:
            prompt = ckpt.prompts.build(messages, enable_thinking=thinking)
        else:
            prompt = ckpt.prompts.build_turn(messages, first_image, enable_thinking=thinking)
        described = describe(messages, prompt.images)
        rebuilt = build_from_pieces(pieces, encode, described, thinking, first_image, k > 0)
        assert rebuilt == (prompt.input_ids, prompt.image_bounds, prompt.text), "pieces disagree with PromptBuilder"
        out.append({"call": "build" if k == 0 else "turn", "messages": described, "enable_thinking": thinking,
                    "first_image": first_image, "input_ids": prompt.input_ids,
                    "image_bounds": [list(b) for b in prompt.image_bounds], "text": prompt.text})
        first_image += len(prompt.images)
    return out


def _write_model(out: Path, name: str, ckpt: Checkpoint) -> dict:
    """`out/name/`: tokenizer files and a manifest with the prompt, tokenizer and preprocessing sections."""
    folder = out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    files = []
    for f in TOKENIZER_FILES:
        if (ckpt.path / f).is_file():
            shutil.copy(ckpt.path / f, folder / f)
            files.append(file_entry(folder, f))
    args = argparse.Namespace(max_slice_nums=None, max_patches=1088, prefill_chunk=128, max_context=4096)
    manifest = build_manifest("onnx", ckpt, name, {}, files, args, "float32", {})
    sections = {k: manifest[k] for k in ("schema_version", "prompt", "tokenizer", "preprocessing")}
    (folder / "manifest.json").write_text(json.dumps(sections, indent=1, ensure_ascii=False) + "\n")
    return manifest["prompt"]


def write(out: Path, models: list[str], images: list[Path], prompts: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()
    for name in models:
        ckpt = Checkpoint.open(name)
        pieces = _write_model(out, name, ckpt)
        thinking_values = (False, True) if ckpt.config.variant.thinking else (False,)
        for case, turns in _conversations(ckpt, images, prompts).items():
            for thinking in thinking_values:
                label = f"{case}_thinking" if thinking else case
                write_case(out, f"{name}__{label}", {"model": name, "directory": name, "case": label,
                                                     "turns": _turns(ckpt, pieces, turns, thinking)})
        encode = ckpt.tokenizer.encode
        for case, (messages, error) in REFUSED.items():
            text = json.loads(json.dumps(messages).replace("{tag}", pieces["image_tag"]))
            try:
                build_from_pieces(pieces, encode, text)
            except UserError as e:
                assert error in str(e), e
            else:
                continue  # this template renders it from the pieces: nothing to refuse
            write_case(out, f"{name}__refused_{case}", {"model": name, "directory": name, "case": f"refused_{case}",
                                                         "turns": [{"call": "build", "messages": text,
                                                                    "enable_thinking": False, "first_image": 0}],
                                                         "error": error})
