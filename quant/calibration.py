"""Calibration data for AWQ: a built-in offline set, or the user's JSONL, as inputs of `model.llm`.

Built-in: synthetic images drawn with PIL (shapes, charts, text, stripes, noise; varied sizes, some of them
sliced) paired with chat prompts, plus text-only chats, some multi-turn with assistant answers. Each is
rendered with the checkpoint's own chat template (`Checkpoint.prompts.build`), the images go through the
model's vision path, and the sample is the prompt's `inputs_embeds`, cut to `seq_len` tokens.

MiniCPM-V 4.6 / 4.7: the same chats through the model's own processor and chat template, as inputs of its Qwen3.5
text model (`hybrid_items`).

User JSONL, one object per line:
    {"images": ["photo.jpg", ...], "messages": [{"role": "user", "content": "..."}, ...]}
    {"text": "plain text, tokenised without a chat template"}
Image paths are relative to the JSONL file; the images go first in the first user message (as upstream
chat()). The first `samples` lines are used.

Audio (`audio=True`, MiniCPM-o's Whisper blocks): deterministic speech-like clips made here (`speech_like`: voiced
syllables with gliding pitch and moving formants, unvoiced bursts, pauses; 0.7 to 9 s), through minicpm.audio's
log-mel features exactly as a recorded clip is processed, one {"audio_features": [1, n_mels, frames]} dict each.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.image_processing import load_image
from minicpm.modeling import MiniCPMV
from quant.layout import is_hybrid

IMAGE_PROMPTS = [
    "What is in this image?", "Describe this image in detail.", "How many shapes can you see? List them.",
    "What colours dominate this picture?", "Read all the text in the image.", "Is there a circle in the image?",
    "Describe the layout of this image from left to right.", "What could this diagram represent?",
    "Write a short caption for this picture.", "Which object is the largest, and where is it?",
    "Summarise this chart: what trend does it show?", "What is written at the top of the image?",
    "Explain what you see to someone who cannot see it.", "Count the red objects.",
    "Is this a photo or a drawing? Why?", "Extract the numbers visible in this image and add them up.",
    "请描述这张图片。", "图中有几个形状？分别是什么颜色？", "这张图片上写了什么字？",
    "Décris cette image en une phrase.",
]
TEXT_CHATS = [
    "Explain the difference between a list and a tuple in Python.",
    "Write a haiku about the sea at night.",
    "What is 17 * 23? Show your working.",
    "Give me three tips for a job interview.",
    "Translate 'Where is the train station?' into French, German and Japanese.",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Why is the sky blue?",
    "用三句话介绍一下长城。",
    "请解释什么是机器学习。",
    "List the planets of the solar system in order from the sun.",
    "What are the main causes of inflation?",
]
MULTI_TURN = [
    [("user", "Can you help me plan a weekend trip to the mountains?"),
     ("assistant", "Of course! How many days do you have, and do you prefer hiking or relaxing?"),
     ("user", "Two days, and I like easy hikes with nice views.")],
    [("user", "What is a prime number?"),
     ("assistant", "A prime number is a whole number greater than 1 whose only divisors are 1 and itself, "
                   "for example 2, 3, 5, 7 and 11."),
     ("user", "Is 91 prime?")],
    [("user", "我想学做饭，应该从哪里开始？"),
     ("assistant", "可以先从简单的家常菜开始，比如番茄炒蛋和青菜，掌握火候和调味。"),
     ("user", "番茄炒蛋怎么做？")],
]
# Held out from calibration, for quality reports.
HELDOUT_IMAGE_PROMPTS = [
    "What shapes are in this picture, and what colour is each one?", "Describe the background of this image.",
    "What text appears in the image?", "这张图里最大的物体是什么？", "Is anything in this image overlapping?",
    "Give a one-line description of this image.",
]
HELDOUT_TEXT = [
    "Explain how a bicycle gear system works.", "Write a limerick about a cat who loves coffee.",
    "What is the capital of Australia, and why is it not Sydney?", "请写一首关于秋天的短诗。",
]
SIZES = [(448, 448), (320, 240), (240, 320), (512, 384), (640, 480), (300, 600), (800, 200), (224, 224)]
WORDS = ["STOP", "OPEN", "SALE 50%", "EXIT", "Hello", "2024", "A B C", "North", "Menu", "3.14", "你好", "Total: 42"]


def synthetic_image(seed: int) -> Image.Image:
    """One varied drawing: a background (flat, gradient, stripes or noise) with shapes, a chart or text."""
    rng = random.Random(seed)
    width, height = SIZES[seed % len(SIZES)]
    colour = lambda: tuple(rng.randrange(256) for _ in range(3))  # noqa: E731
    kind = rng.choice(["flat", "gradient", "stripes", "noise"])
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
        image = Image.fromarray(pixels)
    else:
        image = Image.new("RGB", (width, height), colour())
    draw = ImageDraw.Draw(image)
    if kind == "gradient":
        a, b = colour(), colour()
        for y in range(height):
            t = y / max(height - 1, 1)
            draw.line([(0, y), (width, y)], fill=tuple(int(a[i] * (1 - t) + b[i] * t) for i in range(3)))
    elif kind == "stripes":
        step = rng.randrange(8, 40)
        for x in range(0, width, 2 * step):
            draw.rectangle([x, 0, x + step, height], fill=colour())
    if rng.random() < 0.3:  # a bar chart
        bars = rng.randrange(3, 8)
        bar_w = width // (bars + 1)
        for i in range(bars):
            top = rng.randrange(height // 5, height - 10)
            draw.rectangle([i * bar_w + bar_w // 2, top, (i + 1) * bar_w + bar_w // 4, height - 5], fill=colour())
        draw.line([(5, height - 5), (width - 5, height - 5)], fill=(0, 0, 0), width=2)
    for _ in range(rng.randrange(1, 7)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = min(width, x0 + rng.randrange(10, width // 2 + 11))
        y1 = min(height, y0 + rng.randrange(10, height // 2 + 11))
        shape = rng.choice(["rectangle", "ellipse", "polygon", "line"])
        if shape == "rectangle":
            draw.rectangle([x0, y0, x1, y1], fill=colour(), outline=colour())
        elif shape == "ellipse":
            draw.ellipse([x0, y0, x1, y1], fill=colour())
        elif shape == "polygon":
            draw.polygon([(rng.randrange(width), rng.randrange(height)) for _ in range(rng.randrange(3, 7))],
                         fill=colour())
        else:
            draw.line([(x0, y0), (x1, y1)], fill=colour(), width=rng.randrange(1, 8))
    font = ImageFont.load_default(size=rng.choice([14, 20, 32, 48]))
    for _ in range(rng.randrange(0, 3)):
        draw.text((rng.randrange(width // 2 + 1), rng.randrange(height // 2 + 1)), rng.choice(WORDS),
                  fill=colour(), font=font)
    return image


def default_conversations(samples: int, seed: int = 0, heldout: bool = False) -> list[list[dict]]:
    """`samples` chats: about half with one synthetic image, the rest text-only or multi-turn."""
    rng = random.Random(seed + (10_000 if heldout else 0))
    image_prompts = HELDOUT_IMAGE_PROMPTS if heldout else IMAGE_PROMPTS
    texts = HELDOUT_TEXT if heldout else TEXT_CHATS
    chats = []
    for i in range(samples):
        pick = i % 4
        if pick in (0, 2):
            image = synthetic_image(rng.randrange(1 << 30))
            chats.append([{"role": "user", "content": [image, image_prompts[rng.randrange(len(image_prompts))]]}])
        elif pick == 1 or heldout:
            chats.append([{"role": "user", "content": texts[rng.randrange(len(texts))]}])
        else:
            turns = MULTI_TURN[rng.randrange(len(MULTI_TURN))]
            chats.append([{"role": role, "content": text} for role, text in turns])
    return chats


def _where(path: Path, line: int) -> str:
    return f"{path}:{line}"


def read_jsonl(path: str | os.PathLike, samples: int | None = None) -> list[list[dict] | str]:
    """Chats (message lists with loaded images) or raw texts from a calibration JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"calibration file not found: {path}")
    out: list[list[dict] | str] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            if samples is not None and len(out) >= samples:
                break
            where = _where(path, number)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: invalid JSON ({e.msg})") from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str) and "messages" not in obj:
                out.append(obj["text"])
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list) or not obj["messages"]:
                raise UserError(f'{where}: expected {{"messages": [...], "images": [...]}} or {{"text": "..."}}')
            out.append(_chat(obj, path.parent, where))
    if not out:
        raise UserError(f"{path}: no calibration samples")
    return out


def _chat(obj: dict, base: Path, where: str) -> list[dict]:
    images = obj.get("images", [])
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise UserError(f"{where}: images must be a list of file paths")
    messages = []
    for m in obj["messages"]:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f'{where}: each message needs a role (system, user, assistant) and a text content')
        messages.append({"role": m["role"], "content": m["content"]})
    if images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise UserError(f"{where}: images need a user message to go in")
        try:
            loaded = [load_image(p if os.path.isabs(p) else base / p) for p in images]
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        first_user["content"] = [*loaded, first_user["content"]]
    return messages


AUDIO_SECONDS = [2.4, 0.7, 5.3, 1.0, 3.6, 9.0, 1.7, 4.2]  # calibration clip lengths, cycled


def speech_like(seconds: float, seed: int, rate: int = 16000) -> np.ndarray:
    """A deterministic speech-like clip: syllables of a harmonic voice (pitch gliding around a speaker's base,
    two formant-like resonances moving per syllable), some unvoiced noise bursts and pauses, a faint noise floor.
    Float32 samples in [-1, 1] at `rate`."""
    rng = np.random.RandomState(seed)
    n = max(1, round(seconds * rate))
    t = np.arange(n) / rate
    base = rng.uniform(85, 260)  # the speaker's pitch
    f0 = base * (1 + 0.15 * np.sin(2 * np.pi * rng.uniform(0.3, 1.2) * t) + 0.05 * rng.randn() * t / max(seconds, 1))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    signal = np.zeros(n)
    position = int(rng.uniform(0.02, 0.15) * rate)
    while position < n:
        length = int(rng.uniform(0.08, 0.3) * rate)
        end = min(n, position + length)
        span = np.arange(position, end)
        envelope = np.sin(np.pi * (span - position) / max(length, 1)) ** 2
        if rng.rand() < 0.2:  # an unvoiced consonant: shaped noise
            burst = np.convolve(rng.randn(span.size), np.ones(4) / 4, mode="same")
            signal[span] += 0.15 * envelope * burst
        else:  # a vowel: harmonics weighted by two resonances
            formants = rng.uniform(300, 900), rng.uniform(900, 2600)
            voice = np.zeros(span.size)
            for k in range(1, 16):
                freq = k * f0[span].mean()
                gain = sum(1 / (1 + ((freq - f) / 120) ** 2) for f in formants) / k ** 0.5
                voice += gain * np.sin(k * phase[span])
            signal[span] += 0.3 * envelope * voice / 4
        position = end + int(rng.choice([0.02, 0.05, 0.1, 0.35]) * rate)  # short gaps, sometimes a pause
    signal += 0.003 * rng.randn(n)
    return np.clip(signal, -1, 1).astype(np.float32)


def audio_items(model: MiniCPMV, samples: int, seed: int = 0) -> list[dict]:
    """`samples` clips of `speech_like` audio (lengths cycling through AUDIO_SECONDS) as inputs of the Whisper
    blocks: {"audio_features": [1, n_mels, frames]} (minicpm.audio's recorded-clip features)."""
    from minicpm.audio import process_audio  # noqa: PLC0415

    pool = model.config.audio_pool_step
    return [{"audio_features": torch.from_numpy(process_audio(speech_like(AUDIO_SECONDS[i % len(AUDIO_SECONDS)],
                                                                           seed * 1000 + i), pool).features)[None]}
            for i in range(samples)]


def vision_item(model: MiniCPMV, pixel_values: list[torch.Tensor], tgt_sizes: list[tuple[int, int]]) -> dict:
    """Arguments of `model.vpm` for one image's slices: padded patch rows, position ids, validity mask."""
    inputs = model.vision_inputs(pixel_values, tgt_sizes)
    valid = inputs["patch_mask"] > 0.5
    return {"pixel_values": inputs["pixel_values"], "position_ids": inputs["position_ids"],
            "patch_mask": None if bool(valid.all()) else valid}


@torch.no_grad()
def hybrid_items(ckpt, model, chats: list[list[dict] | str], seq_len: int) -> list[dict]:
    """MiniCPM-V 4.6 / 4.7 (`ckpt` a `minicpm.v4_6.HybridCheckpoint`): each chat through the model's own processor
    and chat template, then the host side of the model's forward (its embeddings with the image features scattered
    in, its M-RoPE positions, canvas ones on 4.7): {"inputs_embeds": [1, L, H], "position_ids": [3, 1, L]} for the
    Qwen3.5 text model, cut to `seq_len` tokens."""
    from minicpm.v4_6 import prompt_embeddings, prompt_positions  # noqa: PLC0415

    items = []
    for chat in chats:
        if isinstance(chat, str):
            inputs = {"input_ids": torch.tensor([ckpt.tokenizer.encode(chat)])}
        else:
            inputs = ckpt.prompts.reference_inputs(chat)
        positions, _ = prompt_positions(model, inputs)
        items.append({"inputs_embeds": prompt_embeddings(model, inputs)[:, :seq_len],
                      "position_ids": positions[:, None, :seq_len]})
    return items


@torch.no_grad()
def build_calibration(ckpt: Checkpoint, model: MiniCPMV, source: str | os.PathLike | None = None,
                      samples: int = 128, seq_len: int = 512, vision: bool = False, seed: int = 0,
                      heldout: bool = False, audio: bool = False) -> list[dict]:
    """Calibration samples for `awq_quantize(model, ...)`: {"inputs_embeds": [1, <=seq_len, H]} per chat
    (built-in set, or the JSONL file `source`), plus, when `vision`, one {"pixel_values", "position_ids",
    "patch_mask"} dict per image for the vision blocks and, when `audio` (MiniCPM-o), `samples` built-in
    speech-like clips {"audio_features": [1, n_mels, frames]} for the Whisper blocks. `heldout` gives prompts,
    images and clips not used for calibration (for quality reports)."""
    if samples < 1:
        raise UserError(f"samples must be >= 1, got {samples}")
    if seq_len < 8:
        raise UserError(f"seq_len must be >= 8, got {seq_len}")
    chats = read_jsonl(source, samples) if source is not None else default_conversations(samples, seed, heldout)
    if is_hybrid(model):
        if vision or audio:
            raise UserError("MiniCPM-V 4.6 / 4.7 calibrate the language model only (no vision or audio samples)")
        return hybrid_items(ckpt, model, chats, seq_len)
    llm_items, vision_items = [], []
    for chat in chats:
        if isinstance(chat, str):
            ids = torch.tensor(ckpt.tokenizer.encode(chat)[:seq_len])
            emb = model.prompt_embeddings(ids, [], torch.zeros(0, model.config.query_num, model.config.hidden_size))
        else:
            prompt = ckpt.prompts.build(chat)
            features = model.encode(prompt.images)  # encode_images per slice (and video frame groups)
            emb = model.prompt_embeddings(torch.tensor(prompt.input_ids), prompt.image_bounds, features)[:seq_len]
            if vision:
                vision_items += [vision_item(model, image.pixel_values, image.tgt_sizes) for image in prompt.images]
        llm_items.append({"inputs_embeds": emb[None]})
    if audio:
        if not hasattr(model, "apm"):
            raise UserError(f"audio calibration: {model.config.variant.name} has no audio encoder (MiniCPM-o only)")
        vision_items += audio_items(model, samples, seed + (10_000 if heldout else 0))
    return vision_items + llm_items
