"""A user turn spoken live (MiniCPM-o): samples in as they arrive, the answer out as soon as the user stops.

Upstream's streaming rules: the mel frames are upstream's live ones (minicpm.audio_streaming: stable frames only,
the fixed log floor under 5 s), the prompt holds one placeholder span per 1 s chunk (`stream_input`), and every
finished chunk is encoded (with the encoder cache of the clip's earlier chunks) and its span prefilled at once. So
when the user stops, only the last partial chunk and the prompt's tail are left: the latency from the last sample
to the first token is one short audio call and one prefill call.

What equals the recorded-clip path, exactly (tests/test_live_audio.py):
- the prompt ids and audio spans equal `PromptBuilder.build(..., stream_input=True)` of the same samples;
- the audio tokens equal the encoding of the same mel frames as one clip (chunked = whole clip, 1e-5), so the
  greedy answer equals `Session.ask` with `stream_input=True` on the clip whose features are the streamed frames;
- the streamed frames are upstream's live features, not the recorded ones (minicpm/audio_streaming.py says
  exactly where they coincide: under 5 s, all but the last frame or two).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from minicpm.audio import SAMPLE_RATE, AudioInputs, audio_tokens, chunk_tokens, placeholder_lengths
from minicpm.audio_streaming import StreamingMel
from minicpm.errors import UserError
from minicpm.generation import GenerationResult, SamplingConfig
from runtime.audio_chunks import AudioChunker, AudioStepSpec


class LiveAudioTurn:
    """One live user turn on a `runtime.session.Session` (made by `Session.listen()`).

    The turn's prefix (everything before the first audio span) is prefilled at once; `feed()` encodes and
    prefills each finished 1 s chunk; `answer()` flushes the rest, closes the prompt and generates."""

    def __init__(self, session, enable_thinking: bool = False):
        manifest = session.manifest
        if "audio" not in manifest["schedule"]["steps"]:
            raise UserError(f"this {manifest['model']['variant']} export has no audio step (live audio needs a "
                            "MiniCPM-o export)")
        self.session, self.enable_thinking = session, enable_thinking
        spec = AudioStepSpec.from_manifest(manifest)
        self.pool = spec.pool
        self.chunker = AudioChunker(spec, session.dtype, getattr(session.backend, "owns_audio_cache", False))
        self.mel = StreamingMel()
        self.frames: list[np.ndarray] = []  # every streamed mel frame, for the final AudioInputs
        self.tokens: list[np.ndarray] = []  # audio tokens not yet prefilled (less than one span)
        self.audio_s: list[float] = []  # seconds of each audio step call
        self.spans = 0
        self.first = session.cache_len == 0 and not session.pending  # the turn opens the conversation
        ids = self._prompt(AudioInputs(np.zeros((80, 100), np.float32), SAMPLE_RATE, 1.0,
                                       audio_tokens(SAMPLE_RATE, self.pool), 1)).input_ids
        start = self.session.checkpoint.prompts.audio_ids[0]
        self.prefilled = ids[: ids.index(start)]  # the prefix: up to the first <|audio_start|>
        self._feed_ids(self.prefilled, generated=len(session.pending))
        self.done = False

    def _prompt(self, audio: AudioInputs, text: str | None = None):
        content = [{"type": "audio", "audio": audio}, *([text] if text else [])]
        return self.session.build_turn([{"role": "user", "content": content}], enable_thinking=self.enable_thinking,
                                       stream_input=True, first=self.first)

    def _feed_ids(self, ids: list[int], audio: np.ndarray | None = None, generated: int = 0) -> None:
        """Prefill `ids` now; `audio` tokens go over its `<unk>` rows (one span: start, unk x n, end)."""
        if not ids:
            return
        self.session.check_room(len(ids))
        embeds = self.session.prompt_embeddings(ids, generated)
        if audio is not None:
            embeds[1:1 + len(audio)] = audio
        self.logits = self.session.prefill(embeds)

    def _span_ids(self, n: int) -> list[int]:
        start, end = self.session.checkpoint.prompts.audio_ids
        unk = self.session.checkpoint.tokenizer.convert_tokens_to_ids("<unk>")
        return [start, *[unk] * n, end]

    def _encode(self, frames: np.ndarray, final: bool) -> None:
        if frames.shape[1] == 0 and not final:
            return
        self.frames.append(frames)
        calls, t = self.chunker.calls, time.perf_counter()
        out = self.chunker.encode(frames, final, self.session.backend.audio)
        if self.chunker.calls > calls:
            self.audio_s.extend([(time.perf_counter() - t) / (self.chunker.calls - calls)] * (self.chunker.calls
                                                                                              - calls))
        self.tokens.append(out)
        pending = np.concatenate(self.tokens)
        per = chunk_tokens(self.pool)
        while len(pending) >= per:  # a finished 1 s chunk: its span goes in now
            ids = self._span_ids(per)
            self._feed_ids(ids, pending[:per])
            self.prefilled += ids
            pending, self.spans = pending[per:], self.spans + 1
        self.tokens = [pending]

    def feed(self, samples: np.ndarray) -> None:
        """Samples as they arrive (float32, 16 kHz mono, any count): finished chunks are encoded and prefilled."""
        if self.done:
            raise UserError("this live audio turn has been answered; start another with Session.listen()")
        self._encode(self.mel.feed(samples), final=False)

    def answer(self, sampling: SamplingConfig, on_text: Callable[[str], None] | None = None,
               text: str | None = None) -> GenerationResult:
        """The user stopped: encode the rest, prefill the last span and the prompt's tail (with `text` after the
        audio, if any) and generate. Stats add the audio ms per chunk and the latency from here (the last sample)
        to the first token."""
        if self.done:
            raise UserError("this live audio turn has been answered already")
        t0 = time.perf_counter()
        self._encode(self.mel.flush(), final=True)
        samples = self.mel.samples
        if audio_tokens(samples, self.pool) == 0:
            raise UserError(f"live audio too short: {samples / SAMPLE_RATE:.3f} s gives no audio token")
        features = np.concatenate(self.frames, axis=1)
        clip = AudioInputs(features, samples, samples / SAMPLE_RATE, audio_tokens(samples, self.pool),
                           -(-samples // (30 * SAMPLE_RATE)))
        turn = self._prompt(clip, text)
        ids = turn.input_ids
        if ids[: len(self.prefilled)] != self.prefilled:
            raise RuntimeError("live audio: the prefilled tokens are not a prefix of the turn's prompt")
        rest = ids[len(self.prefilled):]
        last = np.concatenate(self.tokens)
        lengths = placeholder_lengths(clip.tokens, self.pool, True)
        if len(lengths) != self.spans + (1 if len(last) else 0) or len(last) != (lengths[-1] if len(last) else 0):
            raise RuntimeError(f"live audio: {self.spans} spans and {len(last)} tokens left, the prompt has {lengths}")
        embeds = self.session.prompt_embeddings(rest)
        if len(last):  # the last span leads the rest: <|audio_start|>, its tokens, <|audio_end|>
            embeds[1:1 + len(last)] = last
        self.session.check_room(len(rest))
        self.logits = self.session.prefill(embeds)
        self.session.commit(turn)
        t_first = time.perf_counter()
        generated, answer, finish = self.session.decode(self.logits, sampling, on_text)
        self.done = True
        stats = {"audios": 1, "audio_chunks": len(self.audio_s), "seconds": round(clip.seconds, 3),
                 "audio_ms_per_chunk": round(1000 * float(np.mean(self.audio_s)), 2) if self.audio_s else 0.0,
                 "last_sample_to_first_token_ms": round((t_first - t0) * 1000, 2), "prompt_tokens": len(ids),
                 "new_tokens": len(generated), **self.session.turn_stats(finish)}
        return GenerationResult(generated, answer, stats)
