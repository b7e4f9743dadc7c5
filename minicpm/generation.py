"""Eager reference generation: vision, prompt prefill, token-by-token decode with sampling and streaming.

The sampler and the text streamer are host-side pieces that every runtime backend reuses.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedTokenizerBase

from minicpm.errors import UserError
from minicpm.modeling import MiniCPMV
from minicpm.prompt import Prompt


@dataclass
class SamplingConfig:
    """Greedy by default; otherwise HF-compatible repetition penalty -> temperature -> top-k -> top-p."""

    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_new_tokens: int = 256

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.greedy and self.temperature <= 0:
            raise UserError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


class Sampler:
    """Picks the next token from a logits vector; seeded, so a run is reproducible."""

    def __init__(self, config: SamplingConfig):
        self.config = config
        self.generator = torch.Generator()
        self.generator.manual_seed(config.seed if config.seed is not None else 0)

    def __call__(self, logits: torch.Tensor, previous: list[int]) -> int:
        c = self.config
        logits = logits.float().clone()
        if c.repetition_penalty != 1.0 and previous:
            idx = torch.tensor(sorted(set(previous)))
            scores = logits[idx]
            logits[idx] = torch.where(scores < 0, scores * c.repetition_penalty, scores / c.repetition_penalty)
        if c.greedy:
            return int(torch.argmax(logits))
        logits = logits / c.temperature
        if c.top_k > 0:
            kth = torch.topk(logits, min(c.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if c.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            remove = cumulative <= 1 - c.top_p
            remove[-1] = False  # always keep the most likely token
            logits = logits.masked_fill(remove.scatter(0, order, remove), float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextStreamer:
    """Turns token ids into text pieces as they arrive (holds back incomplete UTF-8 sequences)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, on_text: Callable[[str], None] | None = None):
        self.tokenizer = tokenizer
        self.on_text = on_text
        self.ids: list[int] = []
        self.emitted = 0

    def put(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self._emit(text)

    def end(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if len(text) > self.emitted and self.on_text:
            self.on_text(text[self.emitted:])
        self.emitted = max(self.emitted, len(text))


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    stats: dict = field(default_factory=dict)


def timing_stats(prompt: Prompt, generated: list[int], t0: float, t_vision: float, t_prefill: float,
                 t_end: float, audio_s: float = 0.0) -> dict:
    """The timings every runner reports: vision per slice, time to first token, prefill and decode speed
    (`audio_s`: seconds of audio encoding, counted from t0 before the vision step)."""
    slices = len(prompt.pixel_values)
    decode_s = t_end - t_prefill
    audios = len(getattr(prompt, "audios", []))
    audio = {"audios": audios, "audio_ms": round(audio_s * 1000, 2)} if audios else {}
    return {**audio,
        "prompt_tokens": len(prompt.input_ids),
        "new_tokens": len(generated),
        "images": len(prompt.images),
        "slices": slices,
        "vision_ms": round((t_vision - t0) * 1000, 2),
        "vision_ms_per_slice": round((t_vision - t0) * 1000 / slices, 2) if slices else 0.0,
        "prefill_ms": round((t_prefill - t_vision) * 1000, 2),
        "time_to_first_token_ms": round((t_prefill - t0) * 1000, 2),
        "prefill_tok_s": round(len(prompt.input_ids) / max(t_prefill - t_vision, 1e-9), 2),
        "decode_ms": round(decode_s * 1000, 2),
        "decode_tok_s": round(max(len(generated) - 1, 0) / decode_s, 2) if decode_s > 0 else 0.0,
    }


@torch.no_grad()
def _cache_keyword(llm: torch.nn.Module) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x (the old name warns): the one forward takes."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def generate(model: MiniCPMV, prompt: Prompt, tokenizer: PreTrainedTokenizerBase, sampling: SamplingConfig,
             stop_ids: list[int], on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """Run the eager reference: audio per clip, vision per image/slice, one prefill of the prompt, then decode."""
    t0 = time.perf_counter()
    audios = getattr(prompt, "audios", [])  # fields the prompt side adds for the o-models' audio
    audio = model.encode_audios(audios) if audios else []
    audio_s = time.perf_counter() - t0
    vision = model.encode(prompt.images)
    t_vision = time.perf_counter()
    ids = torch.tensor(prompt.input_ids)
    embeds = model.prompt_embeddings(ids, prompt.image_bounds, vision, getattr(prompt, "audio_bounds", []), audio)
    cache = {_cache_keyword(model.llm): DynamicCache(config=model.llm.config)}
    out = model.llm(inputs_embeds=embeds[None], **cache, use_cache=True, logits_to_keep=1)
    t_prefill = time.perf_counter()
    sampler, streamer = Sampler(sampling), TextStreamer(tokenizer, on_text)
    generated: list[int] = []
    stop = set(stop_ids)
    position = ids.numel()
    while True:
        token = sampler(out.logits[0, -1], generated)
        if token in stop:
            break
        generated.append(token)
        streamer.put(token)
        if len(generated) >= sampling.max_new_tokens:
            break
        step = model.embed_generated(torch.tensor([[token]]))
        out = model.llm(inputs_embeds=step, **cache, use_cache=True,
                        position_ids=torch.tensor([[position]]))
        position += 1
    t_end = time.perf_counter()
    text = streamer.end()
    stats = timing_stats(prompt, generated, t0 + audio_s, t_vision, t_prefill, t_end, audio_s)
    stats["time_to_first_token_ms"] = round((t_prefill - t0) * 1000, 2)
    return GenerationResult(generated, text, stats)
