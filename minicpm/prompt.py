"""Chat messages -> input ids and image placeholder spans, via the checkpoint's own tokenizer and template.

Each image in a message becomes an image tag in the message text (`(<image>./</image>)`, or
`<image>./</image>` for o-4.5; content items joined with "\n"). After the chat template is applied, every
tag is expanded to `<image_id>i</image_id><image>` + 64 x `<unk>` + `</image>` followed by one
`<slice>...</slice>` per grid cell, rows joined by "\n" (upstream MiniCPMVImageProcessor / processors).

MiniCPM-o audio items ({"type": "audio", "audio": path, array or AudioInputs}) become `<audio>./</audio>`
(o-4.5) or `(<audio>./</audio>)` (o-2.6), expanded to `<|audio_start|>` + t x `<unk>` + `<|audio_end|>`: one
span per clip, or one per 1 s chunk with `stream_input` (upstream chat()'s default: off for o-4.5, on for
o-2.6, whose `chunk_input=True`). A prompt holding audio uses upstream's TTS template: o-4.5 ends the
generation prompt with `<|tts_bos|>`, o-2.6 switches to its plain ChatML TTS template (no default system
message) ending `<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast, Qwen2TokenizerFast

from minicpm.audio import AudioInputs, audio_pool_step, audio_tokens, placeholder_lengths, process_audio
from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.image_processing import ImageInputs, process_image, process_video_group


def image_tag(config: MiniCPMConfig) -> str:
    """The per-image tag upstream chat() writes into the message text (o-4.5 dropped the parentheses)."""
    return "<image>./</image>" if config.variant.name == "minicpm-o-4.5" else "(<image>./</image>)"


def audio_tag(config: MiniCPMConfig) -> str:
    """The per-audio tag upstream chat() writes (o-4.5 without parentheses, as its image tag)."""
    return "<audio>./</audio>" if config.variant.name == "minicpm-o-4.5" else "(<audio>./</audio>)"


AUDIO_START, AUDIO_END = "<|audio_start|>", "<|audio_end|>"
# o-2.6 chat(): `default_tts_chat_template`, used instead of the tokenizer's when a message holds audio.
O26_TTS_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
                    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n"
                    "<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>' }}{% endif %}")


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


def is_audio(item) -> bool:
    return isinstance(item, AudioInputs) or (isinstance(item, dict) and item.get("type") == "audio")


@dataclass
class Prompt:
    """What the LLM path needs: token ids, placeholder spans (end exclusive) and the images and audio clips behind
    them. The audio tokens of all clips, in order, fill the audio spans in order (one span per clip, or one per
    1 s chunk when streaming)."""

    input_ids: list[int]
    image_bounds: list[tuple[int, int]]
    images: list[ImageInputs] = field(default_factory=list)
    text: str = ""
    audio_bounds: list[tuple[int, int]] = field(default_factory=list)
    audios: list[AudioInputs] = field(default_factory=list)

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
        self.audio_tag = audio_tag(config) if config.has_audio else None
        vocab = tokenizer.get_vocab()
        self.audio_ids = (vocab.get(AUDIO_START), vocab.get(AUDIO_END)) if config.has_audio else (None, None)

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

    def _message_texts(self, messages: list[dict], joiner: str = "\n") -> tuple[list[dict], list, list]:
        """Messages -> [{"role", "content": text with image and audio tags}], the image items and the audio items
        in order."""
        chat, images, audios = [], [], []
        if not messages:
            raise UserError("no messages")
        for m in messages:
            if not isinstance(m, dict):
                raise UserError(f"a message must be a dict with role and content, got {type(m).__name__}")
            role, content = m.get("role"), m.get("content")
            if role not in ("system", "user", "assistant"):
                raise UserError(f"unknown message role {str(role)[:40]!r} (system, user or assistant)")
            if not (content is None or isinstance(content, str | list | tuple) or is_image(content)
                    or is_audio(content)):
                raise UserError(f"message content must be text, an image or a list of items, got "
                                f"{type(content).__name__}")
            items = [content] if isinstance(content, str) or is_image(content) or is_audio(content) \
                else list(content or [])
            parts = []
            for item in items:
                if is_image(item):
                    if isinstance(item, dict) and not isinstance(item.get("image"), Image.Image | np.ndarray):
                        raise UserError("an {'type': 'image'} content item needs its 'image' (a PIL image or array)")
                    images.append(item["image"] if isinstance(item, dict) else item)
                    parts.append(self.tag)
                elif is_audio(item):
                    if not self.config.has_audio:
                        raise UserError(f"{self.config.variant.name} takes no audio (audio input is MiniCPM-o only)")
                    if isinstance(item, dict) and not isinstance(item.get("audio"), str | Path | np.ndarray
                                                                 | AudioInputs):
                        raise UserError("an {'type': 'audio'} content item needs its 'audio' (a file path, a numpy "
                                        "array or AudioInputs)")
                    audios.append(item)
                    parts.append(self.audio_tag)
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
            chat.append({"role": role, "content": joiner.join(parts)})
        return chat, images, audios

    def _template(self, chat: list[dict], enable_thinking: bool, add_generation_prompt: bool = True,
                  tts: bool = False) -> str:
        kwargs = {"enable_thinking": enable_thinking} if self.config.variant.thinking else {}
        if tts and self.config.variant.name == "minicpm-o-2.6":
            kwargs["chat_template"] = O26_TTS_TEMPLATE
        elif tts:
            kwargs["use_tts_template"] = True  # o-4.5's template appends <|tts_bos|> to the generation prompt
        return self.tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                  **kwargs)

    def _stream(self, stream_input: bool | None) -> bool:
        """Upstream chat()'s default: o-4.5 `stream_input=False`, o-2.6 `chunk_input=True`."""
        return self.config.variant.name == "minicpm-o-2.6" if stream_input is None else bool(stream_input)

    def _tts(self, audios: list, tts_template: bool | None) -> bool:
        """Upstream chat() switches to the TTS template as soon as a message holds audio."""
        if tts_template and not self.config.has_audio:
            raise UserError(f"{self.config.variant.name} has no TTS template (MiniCPM-o only)")
        return bool(audios) if tts_template is None else bool(tts_template)

    def _joiner(self, stream: bool) -> str:
        # o-4.5 chat() joins a message's items with "" when streaming its input; o-2.6 always with "\n".
        return "" if stream and self.config.variant.name == "minicpm-o-4.5" else "\n"

    def render(self, messages: list[dict], enable_thinking: bool = False, stream_input: bool | None = None,
               tts_template: bool | None = None) -> tuple[str, list]:
        """Messages -> (template text with image and audio tags, image items in order)."""
        text, images, _ = self._render(messages, enable_thinking, stream_input, tts_template)
        return text, images

    def _render(self, messages, enable_thinking, stream_input, tts_template) -> tuple[str, list, list]:
        chat, images, audios = self._message_texts(messages, self._joiner(self._stream(stream_input)))
        return self._template(chat, enable_thinking, tts=self._tts(audios, tts_template)), images, audios

    def build(self, messages: list[dict], max_slice_nums: int | None = None, enable_thinking: bool = False,
              stream_input: bool | None = None, tts_template: bool | None = None) -> Prompt:
        """Render, expand image and audio tags, tokenize, and locate the placeholder spans.

        `stream_input`: one audio span per 1 s chunk (default: upstream chat()'s, off for o-4.5, on for o-2.6);
        `tts_template`: upstream's TTS template (default: when a message holds audio)."""
        text, raw_images, raw_audios = self._render(messages, enable_thinking, stream_input, tts_template)
        return self._expand(text, raw_images, max_slice_nums, first_image=0, continuation=False,
                            raw_audios=raw_audios, stream_input=self._stream(stream_input))

    def build_turn(self, messages: list[dict], first_image: int, max_slice_nums: int | None = None,
                   enable_thinking: bool = False, stream_input: bool | None = None,
                   tts_template: bool | None = None) -> Prompt:
        """The tokens that continue a conversation whose KV cache ends with the last generated token.

        The previous answer is closed with `<|im_end|>` (the stop token is never fed back), then the new
        messages follow in ChatML (every supported variant's template) and the template's own generation
        prompt (e.g. the empty think block of Qwen3 templates). Image ids continue from `first_image`.
        Upstream re-renders the whole conversation, so its TTS template applies when any earlier turn held
        audio: pass `tts_template=True` then (the default only sees these messages).
        """
        stream = self._stream(stream_input)
        chat, raw_images, raw_audios = self._message_texts(messages, self._joiner(stream))
        tts = self._tts(raw_audios, tts_template)
        probe = [{"role": "user", "content": "x"}]
        generation_prompt = self._template(probe, enable_thinking, tts=tts)[
            len(self._template(probe, enable_thinking, False, tts=tts)):]
        body = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in chat)
        text = "<|im_end|>\n" + body + generation_prompt
        return self._expand(text, raw_images, max_slice_nums, first_image, continuation=True,
                            raw_audios=raw_audios, stream_input=stream)

    def _expand(self, text: str, raw_images: list, max_slice_nums: int | None, first_image: int,
                continuation: bool, raw_audios: list = (), stream_input: bool = False) -> Prompt:
        tags = [self.tag, *([self.audio_tag] if self.audio_tag else [])]
        parts = re.split("(" + "|".join(re.escape(t) for t in tags) + ")", text)
        if parts[1::2].count(self.tag) != len(raw_images):
            raise UserError(f"the text contains the reserved image tag {self.tag!r}")
        if self.audio_tag and parts[1::2].count(self.audio_tag) != len(raw_audios):
            raise UserError(f"the text contains the reserved audio tag {self.audio_tag!r}")
        images = [process_video_group(im.frames, im.temporal_ids, self.config.slice) if isinstance(im, VideoGroup)
                  else process_image(im, self.config.slice, max_slice_nums=max_slice_nums) for im in raw_images]
        audios = [self.audio_inputs(a) for a in raw_audios]
        spans = [n for a in audios for n in placeholder_lengths(a.tokens, audio_pool_step(self.config), stream_input)]
        image_iter, audio_iter = iter(enumerate(images)), iter(audios)
        for k in range(1, len(parts), 2):
            if parts[k] == self.tag:
                i, im = next(image_iter)
                parts[k] = self.image_placeholder(im, first_image + i)
            else:
                parts[k] = self.audio_placeholder(next(audio_iter), stream_input)
        final = "".join(parts)
        # A continuation gets no BOS: it is appended to tokens already in the cache.
        ids = self.tokenizer.encode(final, add_special_tokens=not continuation)
        input_ids = [t for t in ids if t not in self.dropped_ids]
        audio_bounds = self.audio_bounds(input_ids, spans)
        return Prompt(input_ids, self.image_bounds(input_ids), images, final, audio_bounds, audios)

    def audio_inputs(self, item) -> AudioInputs:
        """An audio content item -> AudioInputs for this model's pooling (files and arrays are processed here)."""
        pool = audio_pool_step(self.config)
        source = item.get("audio") if isinstance(item, dict) else item
        if isinstance(source, AudioInputs):
            if source.tokens != audio_tokens(source.samples, pool) or source.tokens < 1:
                raise UserError(f"AudioInputs with {source.tokens} tokens for {source.samples} samples was made for "
                                f"another audio_pool_step than this model's {pool}")
            return source
        rate = item.get("sample_rate") if isinstance(item, dict) else None
        return process_audio(source, pool, sample_rate=rate)

    def audio_placeholder(self, audio: AudioInputs, stream_input: bool) -> str:
        unk = self.special.unk
        return "".join(AUDIO_START + unk * n + AUDIO_END
                       for n in placeholder_lengths(audio.tokens, audio_pool_step(self.config), stream_input))

    def audio_bounds(self, input_ids: list[int], spans: list[int]) -> list[tuple[int, int]]:
        """[start, end) of each audio span (between `<|audio_start|>` and `<|audio_end|>`), checked against the
        `<unk>` counts the clips need (a stray audio token in the text would shift them)."""
        start_id, end_id = self.audio_ids
        if start_id is None or end_id is None:
            if spans:
                raise UserError(f"the tokenizer lacks the audio placeholder tokens {AUDIO_START} / {AUDIO_END}")
            return []
        starts = [i + 1 for i, t in enumerate(input_ids) if t == start_id]
        ends = [i for i, t in enumerate(input_ids) if t == end_id]
        bounds = list(zip(starts, ends, strict=False))
        if len(starts) != len(ends) or [e - s for s, e in bounds] != spans:
            raise UserError(f"the text contains the reserved audio tokens {AUDIO_START} / {AUDIO_END}")
        return bounds

    def image_bounds(self, input_ids: list[int]) -> list[tuple[int, int]]:
        starts = [i + 1 for i, t in enumerate(input_ids) if t in self.start_ids]
        ends = [i for i, t in enumerate(input_ids) if t in self.end_ids]
        if len(starts) != len(ends) or any(e < s for s, e in zip(starts, ends, strict=True)):
            raise UserError("unbalanced image placeholder tokens in the prompt")
        return list(zip(starts, ends, strict=True))
