"""Chat messages -> input ids and image placeholder spans, via the checkpoint's own tokenizer and template.

Each image in a message becomes an image tag in the message text (`(<image>./</image>)`, or
`<image>./</image>` for o-4.5; content items joined with "\n"). After the chat template is applied, every
tag is expanded to `<image_id>i</image_id><image>` + 64 x `<unk>` + `</image>` followed by one
`<slice>...</slice>` per grid cell, rows joined by "\n" (upstream MiniCPMVImageProcessor / processors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2TokenizerFast

from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.image_processing import ImageInputs, process_image, process_video_group


def image_tag(config: MiniCPMConfig) -> str:
    """The per-image tag upstream chat() writes into the message text (o-4.5 dropped the parentheses)."""
    return "<image>./</image>" if config.variant.name == "minicpm-o-4.5" else "(<image>./</image>)"


@dataclass(frozen=True)
class SpecialTokens:
    """Placeholder token strings (from preprocessor_config.json when present)."""

    im_start: str = "<image>"
    im_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    im_id_start: str = "<image_id>"
    im_id_end: str = "</image_id>"
    unk: str = "<unk>"

    @classmethod
    def from_dir(cls, path: Path) -> SpecialTokens:
        f = path / "preprocessor_config.json"
        raw = json.loads(f.read_text()) if f.is_file() else {}
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer, loaded without remote code: tokenizer.json, else Qwen's vocab.json +
    merges.txt, else a SentencePiece tokenizer.model."""
    path = Path(path)
    try:
        if (path / "tokenizer.json").is_file():
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tok = Qwen2TokenizerFast.from_pretrained(str(path))
        elif (path / "tokenizer.model").is_file():  # SentencePiece only (MiniCPM / Llama family)
            from transformers import LlamaTokenizerFast  # noqa: PLC0415

            tok = LlamaTokenizerFast.from_pretrained(str(path))
        else:
            raise UserError(f"{path}: no tokenizer files (tokenizer.json, vocab.json + merges.txt, or tokenizer.model)")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if not tok.chat_template:
        raise UserError(f"{path}: the tokenizer has no chat template")
    return tok


@dataclass
class VideoGroup:
    """Frames resampled together (MiniCPM-V 4.5): one placeholder span for the whole group."""

    frames: list
    temporal_ids: list[int]


def video_groups(item: dict) -> list[VideoGroup]:
    """{"type": "video", "frames": [...], "temporal_ids": [[t, ...], ...]} -> one group per inner list
    (temporal ids in 0.1 s units, as upstream `chat(temporal_ids=...)`; consecutive frames per group)."""
    frames, groups = list(item.get("frames") or []), item.get("temporal_ids") or []
    if sum(len(g) for g in groups) != len(frames) or not frames:
        raise UserError(f"video: {len(frames)} frames but temporal_ids cover {sum(len(g) for g in groups)}")
    out, start = [], 0
    for g in groups:
        out.append(VideoGroup(frames[start:start + len(g)], list(g)))
        start += len(g)
    return out


def is_image(item) -> bool:
    return isinstance(item, Image.Image | np.ndarray) or (isinstance(item, dict) and item.get("type") == "image")


@dataclass
class Prompt:
    """What the LLM path needs: token ids, placeholder spans (end exclusive) and the images behind them."""

    input_ids: list[int]
    image_bounds: list[tuple[int, int]]
    images: list[ImageInputs] = field(default_factory=list)
    text: str = ""

    @property
    def pixel_values(self) -> list[torch.Tensor]:
        """Every slice (or video frame) in order."""
        return [pv for im in self.images for pv in im.pixel_values]

    @property
    def tgt_sizes(self) -> list[tuple[int, int]]:
        return [t for im in self.images for t in im.tgt_sizes]


class PromptBuilder:
    """Renders chat messages for one checkpoint (tokenizer + config + placeholder tokens)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: MiniCPMConfig,
                 special: SpecialTokens | None = None):
        self.tokenizer = tokenizer
        self.config = config
        self.special = special or SpecialTokens()
        ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in vars(self.special).items()}
        missing = [getattr(self.special, n) for n, i in ids.items() if i is None or i == tokenizer.unk_token_id
                   and n != "unk"]
        if missing:
            raise UserError(f"tokenizer lacks the image placeholder tokens {missing}")
        self.start_ids = {ids["im_start"], ids["slice_start"]}
        self.end_ids = {ids["im_end"], ids["slice_end"]}
        self.tag = image_tag(config)
        # o-4.5's processor deletes <|listen|> ids after tokenising (a duplex-mode marker).
        listen = tokenizer.get_vocab().get("<|listen|>") if config.variant.name == "minicpm-o-4.5" else None
        self.dropped_ids = {listen} if listen is not None else set()

    def image_placeholder(self, image: ImageInputs, index: int) -> str:
        s, q = self.special, self.config.query_num
        text = s.im_start + s.unk * q + s.im_end
        if image.temporal_ids is not None:  # a video group: no image id, no slices (upstream video chat)
            return text
        if self.config.use_image_id:
            text = f"{s.im_id_start}{index}{s.im_id_end}" + text
        if image.sliced.grid is not None:
            cols, rows = image.sliced.grid
            cell = s.slice_start + s.unk * q + s.slice_end
            text += "\n".join(cell * cols for _ in range(rows))
        return text

    def _message_texts(self, messages: list[dict]) -> tuple[list[dict], list]:
        """Messages -> [{"role", "content": text with image tags}], and the image items in order."""
        chat, images = [], []
        if not messages:
            raise UserError("no messages")
        for m in messages:
            if not isinstance(m, dict):
                raise UserError(f"a message must be a dict with role and content, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise UserError(f"unknown message role {str(role)[:40]!r} (system, user or assistant)")
            if not (content is None or isinstance(content, str | list | tuple) or is_image(content)):
                raise UserError(f"message content must be text, an image or a list of items, got "
                                f"{type(content).__name__}")
            items = [content] if isinstance(content, str) or is_image(content) else list(content or [])
            parts = []
            for item in items:
                if is_image(item):
                    if isinstance(item, dict) and not isinstance(item.get("image"), Image.Image | np.ndarray):
                        raise UserError("an {'type': 'image'} content item needs its 'image' (a PIL image or array)")
                    images.append(item["image"] if isinstance(item, dict) else item)
                    parts.append(self.tag)
                elif isinstance(item, dict) and item.get("type") == "video":
                    groups = video_groups(item)
                    images.extend(groups)
                    parts.extend(self.tag for _ in groups)
                elif isinstance(item, dict) and item.get("type") == "text":
                    parts.append(item["text"])
                elif isinstance(item, str):
                    parts.append(item)
                else:
                    raise UserError(f"unsupported message content item of type {type(item).__name__}")
            chat.append({"role": role, "content": "\n".join(parts)})
        return chat, images

    def _template(self, chat: list[dict], enable_thinking: bool, add_generation_prompt: bool = True) -> str:
        kwargs = {"enable_thinking": enable_thinking} if self.config.variant.thinking else {}
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def render(self, messages: list[dict], enable_thinking: bool = False) -> tuple[str, list]:
        """Messages -> (template text with image tags, image items in order)."""
        chat, images = self._message_texts(messages)
        return self._template(chat, enable_thinking), images

    def build(self, messages: list[dict], max_slice_nums: int | None = None,
              enable_thinking: bool = False) -> Prompt:
        """Render, expand image tags, tokenize, and locate the placeholder spans."""
        text, raw_images = self.render(messages, enable_thinking)
        return self._expand(text, raw_images, max_slice_nums, first_image=0, continuation=False)

    def build_turn(self, messages: list[dict], first_image: int, max_slice_nums: int | None = None,
                   enable_thinking: bool = False) -> Prompt:
        """The tokens that continue a conversation whose KV cache ends with the last generated token.

        The previous answer is closed with `<|im_end|>` (the stop token is never fed back), then the new
        messages follow in ChatML (every supported variant's template) and the template's own generation
        prompt (e.g. the empty think block of Qwen3 templates). Image ids continue from `first_image`.
        """
        chat, raw_images = self._message_texts(messages)
        probe = [{"role": "user", "content": "x"}]
        generation_prompt = self._template(probe, enable_thinking)[len(self._template(probe, enable_thinking,
                                                                                      False)):]
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
        text = "<|im_end|>\n" + body + generation_prompt
        return self._expand(text, raw_images, max_slice_nums, first_image, continuation=True)

    def _expand(self, text: str, raw_images: list, max_slice_nums: int | None, first_image: int,
                continuation: bool) -> Prompt:
        chunks = text.split(self.tag)
        if len(chunks) - 1 != len(raw_images):
            raise UserError(f"the text contains the reserved image tag {self.tag!r}")
        images = [process_video_group(im.frames, im.temporal_ids, self.config.slice) if isinstance(im, VideoGroup)
                  else process_image(im, self.config.slice, max_slice_nums=max_slice_nums) for im in raw_images]
        final = chunks[0] + "".join(self.image_placeholder(im, first_image + i) + chunks[i + 1]
                                    for i, im in enumerate(images))
        # A continuation gets no BOS: it is appended to tokens already in the cache.
        ids = self.tokenizer.encode(final, add_special_tokens=not continuation)
        input_ids = [t for t in ids if t not in self.dropped_ids]
        return Prompt(input_ids, self.image_bounds(input_ids), images, final)

    def image_bounds(self, input_ids: list[int]) -> list[tuple[int, int]]:
        starts = [i + 1 for i, t in enumerate(input_ids) if t in self.start_ids]
        ends = [i for i, t in enumerate(input_ids) if t in self.end_ids]
        if len(starts) != len(ends) or any(e < s for s, e in zip(starts, ends, strict=True)):
            raise UserError("unbalanced image placeholder tokens in the prompt")
        return list(zip(starts, ends, strict=True))
