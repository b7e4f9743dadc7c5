"""The device schedule, run by the host: the reference the Swift runtime mirrors.

One conversation = one KV cache of `max_context` slots. A turn: preprocess (slices, audio features, prompt ids),
audio per 1 s chunk (runtime/audio_chunks.py), vision per batch of slices, embedding lookup + scatter of audio and
vision features, chunked prefill of the new tokens only, then token-by-token decode with sampling and streaming.
Follow-up turns reuse the cache.

What the LLM step carries between calls comes from the manifest. Older exports: one KV cache (`schedule.kv_cache`,
host arrays `keys` / `values`; with `slots = "filled"` a step gets only the filled slots). Hybrid exports (MiniCPM-V
4.6 / 4.7, `schedule.state`): the per-layer state as data, kept in a `minicpm.cache.StateCache` (valid K/V rows
appended, conv and recurrent states replaced after every call), positions as M-RoPE rows, prompts from the model's
own processor and chat template. The schedule (chunked prefill, decode, multi-turn reuse, the context-full policy)
is the same code for both. "Context" is the full-attention KV: only it grows with the conversation; a linear layer's
state has a fixed size whatever the length, so `max_context` bounds the KV slots and nothing else.

Images on hybrid exports: the model's own processor slices them with the prompt (`minicpm.v4_6.HybridPromptBuilder`),
each slice goes through the vision step alone at the fixed patch row of `steps.vision` (host inputs from
`minicpm.hybrid_vision.vision_inputs`, the layout read from the manifest), its valid rows fill its placeholder run.
Positions: `schedule.positions.canvas` (4.7) gives a turn with images the model's canvas positions, computed on the
host with the model's own position code over the turn's tokens and placed after the state's last position; the
turn's delta then carries on to decode and later turns. Without it (4.6) image tokens take text positions.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import torch

from minicpm.cache import StateCache, StateSpec
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.generation import GenerationResult, Sampler, SamplingConfig, TextStreamer, timing_stats
from minicpm.modeling import video_inputs, vision_inputs
from minicpm.prompt import Prompt
from runtime.audio_chunks import AudioChunker, AudioStepSpec
from runtime.backends import default_backend, open_backend
from runtime.manifest import artifact_path, read_manifest

VISION_BATCH = 8  # slices per vision call: bounds activation memory, amortises graph overhead
NEG_INF = np.float32(-1e30)  # additive mask value; finite so fully masked pad rows never produce NaN


class ContextFull(UserError):
    """The conversation no longer fits in the KV cache."""


TABLE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}  # numpy has no bfloat16 of its own


def _embedding_table(directory: Path, manifest: dict) -> np.memmap:
    """The raw [V, H] table, memory-mapped; refused in one line unless the file holds exactly what the manifest says."""
    entry = manifest["artifacts"].get("token_embedding")
    if entry is None or entry.get("dtype") not in TABLE_DTYPES or len(entry.get("shape", [])) != 2:
        raise UserError(f"{directory}: manifest.json lacks a token_embedding artifact with a float32/float16/bfloat16 "
                        "dtype and a [vocab, hidden] shape")
    vocab, hidden = entry["shape"]
    dtype = TABLE_DTYPES[entry["dtype"]].newbyteorder("<")
    path = artifact_path(directory, manifest, "token_embedding")
    size = vocab * hidden * dtype.itemsize
    if vocab < 1 or hidden != manifest["model"]["hidden_size"] or path.stat().st_size != size:
        raise UserError(f"{directory}: token_embedding ({path.name}) does not hold the [{vocab}, {hidden}] "
                        f"{entry['dtype']} table the manifest describes")
    return np.memmap(path, dtype=dtype, mode="r", shape=(vocab, hidden))


class Session:
    """Loads an export directory (verifying every hash first) and runs conversations on a backend."""

    def __init__(self, directory: str | Path, backend: str | object | None = None, on_context_full: str | None = None,
                 threads: int | None = None):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)  # schema, paths and hashes checked before anything runs
        schedule, pre = self.manifest["schedule"], self.manifest["preprocessing"]
        # A hybrid export's step carries the per-layer state the manifest describes (see the module doc).
        self.state_spec = StateSpec.from_dict(schedule["state"]) if "state" in schedule else None
        if self.state_spec:
            from minicpm.v4_6 import HybridCheckpoint  # noqa: PLC0415

            self.checkpoint = HybridCheckpoint.open(self.directory)  # config, tokenizer and processor files
            self._check_state_outputs()
        else:
            self.checkpoint = Checkpoint.open(self.directory)  # config and tokenizer files copied by the exporter
        self.chunk = schedule["prefill_chunk"]
        # the shortest T the prefill step takes (a graph with dynamic T: 1, so a short chunk is not padded);
        # None: every call is padded to `chunk`
        self.min_prefill = schedule["steps"]["prefill"].get("min_tokens")
        # the step's cache axis: the filled slots only (and the mask over them), or all max_context slots
        self.filled_slots = schedule.get("kv_cache", {}).get("slots") == "filled"
        self.max_context = schedule["max_context"]
        self.max_patches = pre.get("max_patches")
        self.on_context_full = on_context_full or schedule["on_context_full"]
        if self.on_context_full not in ("error", "stop"):
            raise UserError(f"on_context_full must be 'error' or 'stop', got {self.on_context_full!r}")
        self.table = _embedding_table(self.directory, self.manifest)
        self.dtype = np.float16 if self.manifest["model"]["dtype"] == "float16" else np.float32
        # None: the export's own runtime; a backend name; or an object with the backends' methods (e.g. a test's
        # instrumented modules)
        backend = backend or default_backend(self.manifest)
        self.backend = open_backend(backend, self.directory, self.manifest, threads) if isinstance(backend, str) \
            else backend
        self.reset()

    # ----- conversation state --------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation: empty cache, no history."""
        if self.state_spec:
            # zeroed KV slots, conv and recurrent states; a backend whose graph keeps them as model state (Core AI,
            # ExecuTorch: `owns_state`) holds them itself and the host keeps only the token count
            self.state = StateCache(self.state_spec, hold=not getattr(self.backend, "owns_state", False))
            self.rope_delta = 0  # decode position = sequence index + delta (4.7 images make it negative)
            self.turn_positions = None  # (first sequence index, [3, n] positions) of a canvas-positioned turn
        else:
            kv = self.manifest["schedule"]["kv_cache"]
            # Backends whose graphs keep the cache as state (Core ML, ExecuTorch) reset it themselves.
            shape = (0,) if getattr(self.backend, "owns_cache", False) else kv["shape"]
            self.keys = np.zeros(shape, dtype=self.dtype)
            self.values = np.zeros(shape, dtype=self.dtype)
        if hasattr(self.backend, "reset"):
            self.backend.reset()
        self.cache_len = 0  # filled KV slots
        self.history = Prompt([], [], [])  # the tokens in those slots, with their image/audio spans and inputs
        self.pending: list[int] = []  # a generated token not fed yet (an answer cut by max_new_tokens)
        self.tts_template = False  # upstream re-renders with its TTS template once any message held audio

    def _append_history(self, turn: Prompt) -> None:
        offset = len(self.history.input_ids)
        self.history.input_ids.extend(turn.input_ids)
        self.history.image_bounds.extend((s + offset, e + offset) for s, e in turn.image_bounds)
        self.history.images.extend(turn.images)
        self.history.audio_bounds.extend((s + offset, e + offset) for s, e in turn.audio_bounds)
        self.history.audios.extend(turn.audios)

    # ----- one turn --------------------------------------------------------------------------------------

    def ask(self, messages: list[dict], sampling: SamplingConfig, on_text: Callable[[str], None] | None = None,
            max_slice_nums: int | None = None, enable_thinking: bool = False,
            stream_input: bool | None = None) -> GenerationResult:
        """Add `messages` (the new turn) to the conversation and generate the answer. `stream_input`: one audio
        span per 1 s chunk (default: upstream chat()'s for the model)."""
        turn = self.build_turn(messages, max_slice_nums, enable_thinking, stream_input)
        self.check_room(len(turn.input_ids))
        t0 = time.perf_counter()
        audio, audio_calls = self._audio(turn)
        t_audio = time.perf_counter()
        features = self._vision(turn)
        t_vision = time.perf_counter()
        embeds = self.prompt_embeddings(turn.input_ids, len(self.pending))
        offset = 0
        for start, end in turn.audio_bounds:  # all clips' tokens, in order, over the audio spans in order
            embeds[start:end] = audio[offset:offset + end - start]
            offset += end - start
        for (start, end), feats in zip(turn.image_bounds, features, strict=True):
            embeds[start:end] = feats
        if self.state_spec:
            self.place_positions(turn)
        logits = self.prefill(embeds)
        self.commit(turn)
        t_prefill = time.perf_counter()
        generated, text, finish = self.decode(logits, sampling, on_text)
        audio_stats = {"audio_chunks": audio_calls,
                       "audio_ms_per_chunk": round((t_audio - t0) * 1000 / audio_calls, 2)} if audio_calls else {}
        stats = {**timing_stats(turn, generated, t_audio, t_vision, t_prefill, time.perf_counter(), t_audio - t0),
                 **audio_stats, **self.turn_stats(finish), "time_to_first_token_ms": round((t_prefill - t0) * 1000, 2)}
        return GenerationResult(generated, text, stats)

    def listen(self, enable_thinking: bool = False):
        """Start a user turn spoken live (MiniCPM-o): returns a `runtime.live_audio.LiveAudioTurn`; `feed()` it
        samples as they arrive (each finished 1 s chunk is encoded and prefilled at once), then `answer()`."""
        from runtime.live_audio import LiveAudioTurn  # noqa: PLC0415

        return LiveAudioTurn(self, enable_thinking)

    # ----- the parts of a turn (shared with runtime.live_audio) -----------------------------------------

    def build_turn(self, messages: list[dict], max_slice_nums: int | None = None, enable_thinking: bool = False,
                   stream_input: bool | None = None, first: bool | None = None) -> Prompt:
        """The new turn's prompt: the whole prompt on an empty cache (or `first`), else the continuation, led by
        a pending generated token (an answer cut by max_new_tokens) that was never fed."""
        self._check_modalities(messages)
        max_slices = max_slice_nums or self.manifest["preprocessing"].get("max_slice_nums")
        prompts = self.checkpoint.prompts
        if first if first is not None else (self.cache_len == 0 and not self.pending):
            return prompts.build(messages, max_slice_nums=max_slices, enable_thinking=enable_thinking,
                                 stream_input=stream_input)
        turn = prompts.build_turn(messages, len(self.history.images), max_slice_nums=max_slices,
                                  enable_thinking=enable_thinking, stream_input=stream_input,
                                  tts_template=self.tts_template or None)
        n = len(self.pending)
        return Prompt(self.pending + turn.input_ids, [(s + n, e + n) for s, e in turn.image_bounds], turn.images,
                      turn.text, [(s + n, e + n) for s, e in turn.audio_bounds], turn.audios)

    def _check_modalities(self, messages: list[dict]) -> None:
        """A hybrid export lists what its graphs take (`schedule.modalities`); anything else is one line."""
        modalities = self.manifest["schedule"].get("modalities")
        if modalities is None:
            return
        for m in messages:
            for item in [] if isinstance(m["content"], str) else m["content"]:
                kind = "text" if isinstance(item, str) else (item.get("type", "image") if isinstance(item, dict)
                                                             else "image")
                if kind not in modalities:
                    step = "vision" if kind == "image" else kind
                    raise UserError(f"this {self.manifest['model']['variant']} export takes "
                                    f"{', '.join(modalities)} only: {kind} input needs a {step} step, which this "
                                    "export does not have")

    def _check_state_outputs(self) -> None:
        """The graph's outputs must be the logits, then one update per state tensor in the spec's order."""
        outputs = [o["name"] for o in self.manifest["artifacts"].get("llm", {}).get("outputs", [])]
        expected = ["logits"] + [t.output for t in self.state_spec.tensors]
        if outputs and outputs != expected:
            raise UserError(f"manifest.json: the llm artifact's outputs {outputs} do not match schedule.state "
                            f"(expected {expected})")

    def check_room(self, tokens: int) -> None:
        needed = self.cache_len + tokens
        if needed > self.max_context:
            raise ContextFull(f"context full: the conversation needs {needed} tokens before answering, the export "
                              f"holds {self.max_context} (/reset, or re-export with a larger --max-context)")

    def prompt_embeddings(self, ids: list[int], generated: int = 0) -> np.ndarray:
        """Prompt embeddings [n, H]; the first `generated` ids are generated tokens (embedded without the scale)."""
        schedule = self.manifest["schedule"]
        embeds = self._embed(ids, schedule["prompt_embedding_scale"])
        embeds[:generated] = self._embed(ids[:generated], schedule["generated_embedding_scale"])
        return embeds

    def commit(self, turn: Prompt) -> None:
        """The turn's tokens are in the cache: record them."""
        self._append_history(turn)
        self.pending = []
        self.tts_template = self.tts_template or bool(turn.audios)

    def decode(self, logits: np.ndarray, sampling: SamplingConfig, on_text: Callable[[str], None] | None
               ) -> tuple[list[int], str, str]:
        """Sample from the prefill's logits, then token by token until a stop token, max_new_tokens or a full
        context. Returns (tokens, text, finish reason)."""
        sampler, streamer = Sampler(sampling), TextStreamer(self.checkpoint.tokenizer, on_text)
        stop, generated, finish = set(self.manifest["tokenizer"]["stop_ids"]), [], "length"
        while True:
            token = sampler(torch.from_numpy(logits), generated)
            if token in stop:  # never fed: the next turn closes the answer with <|im_end|>
                finish = "stop"
                break
            generated.append(token)
            streamer.put(token)
            if len(generated) >= sampling.max_new_tokens:
                self.pending = [token]
                break
            if self.cache_len >= self.max_context:
                if self.on_context_full == "stop":
                    self.pending, finish = [token], "context_full"
                    break
                raise ContextFull(f"context full after {len(generated)} new tokens ({self.max_context} slots): "
                                  "/reset, or re-export with a larger --max-context")
            logits = self._run_llm(self._embed([token], self.manifest["schedule"]["generated_embedding_scale"]), 1)
            self._append_history(Prompt([token], [], []))
        return generated, streamer.end(), finish

    def turn_stats(self, finish: str) -> dict:
        return {"context_tokens": self.cache_len, "finish_reason": finish,
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "backend": self.backend.name}

    # ----- steps -----------------------------------------------------------------------------------------

    def _audio(self, turn: Prompt) -> tuple[np.ndarray, int]:
        """The audio tokens of every clip of the turn, concatenated in order ([t, H]), and the audio step calls:
        each clip through the export's audio step, 1 s chunk by chunk with its encoder cache."""
        hidden = self.manifest["model"]["hidden_size"]
        if not turn.audios:
            return np.zeros((0, hidden), dtype=np.float32), 0
        if "audio" not in self.manifest["schedule"]["steps"]:
            raise UserError(f"this {self.manifest['model']['variant']} export has no audio step (audio needs a "
                            "MiniCPM-o export)")
        spec, out, calls = AudioStepSpec.from_manifest(self.manifest), [], 0
        for clip in turn.audios:
            chunker = AudioChunker(spec, self.dtype, getattr(self.backend, "owns_audio_cache", False))
            out.append(chunker.encode(clip.features, True, self.backend.audio))
            calls += chunker.calls
        return np.concatenate(out), calls

    def _vision(self, turn: Prompt) -> list[np.ndarray]:
        """One feature block per placeholder span, in prompt order: image slices in batches of the vision
        step, video frame groups in batches of the video step."""
        if self.state_spec:
            return self._hybrid_vision(turn)
        slices = [im for im in turn.images if im.temporal_ids is None]
        groups = [im for im in turn.images if im.temporal_ids is not None]
        rows = [pv for im in slices for pv in im.pixel_values]
        sizes = [t for im in slices for t in im.tgt_sizes]
        too_big = [h * w for h, w in sizes + [t for g in groups for t in g.tgt_sizes] if h * w > self.max_patches]
        if too_big:
            raise UserError(f"a slice has {max(too_big)} patches but this export's vision graph takes "
                            f"{self.max_patches} (re-export with --max-patches {max(too_big)} or use fewer "
                            "slices for such extreme aspect ratios)")
        pre, hidden = self.manifest["preprocessing"], self.manifest["model"]["hidden_size"]
        image_features = []
        for start in range(0, len(rows), VISION_BATCH):
            part = slice(start, start + VISION_BATCH)
            batch = vision_inputs(rows[part], sizes[part], pre["patch_size"], pre["num_patches_per_side"], hidden,
                                  pad_to=self.max_patches)
            image_features.extend(self.backend.vision(**self._floats(batch)).astype(np.float32))
        group_features = self._video(groups)
        images, videos = iter(image_features), iter(group_features)
        return [f for im in turn.images
                for f in ([next(images) for _ in im.pixel_values] if im.temporal_ids is None else [next(videos)])]

    def _hybrid_vision(self, turn: Prompt) -> list[np.ndarray]:
        """A hybrid export's image features: each slice (`HybridImage.slices`, the processor's order) through the
        vision step alone, padded to the graph's patch row; the first `layout.tokens(h, w)` rows are the slice's
        tokens, one block per placeholder run. The layout is the manifest's `steps.vision`, not the model config."""
        if not turn.images:
            return []
        from minicpm.hybrid_vision import VisionLayout, vision_inputs  # noqa: PLC0415

        step = self.manifest["schedule"]["steps"]["vision"]  # present: _check_modalities refused images otherwise
        layout = VisionLayout(step["patch_size"], step["num_patches_per_side"], step["window"], tuple(step["merge"]),
                              step["merger_times"])
        out = []
        for image in turn.images:
            for one in image.slices():
                h, w = (int(v) for v in one["target_sizes"][0])
                try:
                    inputs = vision_inputs(one, step["max_patches"], layout)
                except ValueError as e:  # a slice above the exported patch row (an extreme aspect ratio)
                    raise UserError(str(e)) from None
                inputs = {k: v.astype(self.dtype) if v.dtype == np.float32 else v for k, v in inputs.items()}
                features = self.backend.vision(**inputs)
                out.append(np.asarray(features, dtype=np.float32)[: layout.tokens(h, w)])
        return out

    def place_positions(self, turn: Prompt) -> None:
        """Before a hybrid turn's prefill: its tokens' M-RoPE positions. Text positions (sequence index + delta) need
        nothing here. With `schedule.positions.canvas` (4.7) a turn holding images takes the model's canvas
        positions, computed over the turn's own tokens (`minicpm.v4_6.canvas_positions`) and shifted to the turn's
        first position (its index + delta: where a whole-conversation get_rope_index puts it, the layout being
        relative). The delta grows by the turn's own, so decode and later turns continue after its last position."""
        self.turn_positions = None
        if not turn.images or not self.manifest["schedule"]["positions"].get("canvas"):
            return
        from minicpm.v4_6 import canvas_positions  # noqa: PLC0415

        sizes = [size for image in turn.images for size in image.tgt_sizes]
        table, delta = canvas_positions(self.checkpoint.variant.model_class, self.checkpoint.config, turn.input_ids,
                                        sizes, self.manifest["preprocessing"].get("downsample_mode"))
        first = self.state.length
        self.turn_positions = (first, table + first + self.rope_delta)
        self.rope_delta += delta

    def _step_positions(self, start: int, width: int) -> np.ndarray:
        """[3, width] int64 positions of the tokens at sequence indices start .. start + width - 1 (pad rows
        included): index + delta on all three rows, or the current turn's canvas positions where it has them;
        clamped into the graph's rotary table."""
        index = np.arange(start, start + width)
        positions = np.broadcast_to(index + self.rope_delta, (3, width)).copy()
        if self.turn_positions is not None:
            first, table = self.turn_positions
            inside = (index >= first) & (index < first + table.shape[1])
            positions[:, inside] = table[:, index[inside] - first]
        return np.clip(positions, 0, self.max_context - 1).astype(np.int64)

    def _video(self, groups: list) -> list[np.ndarray]:
        """Frame groups through the export's video step (the 3D resampler), `VISION_BATCH` groups per call."""
        if not groups:
            return []
        step = self.manifest["schedule"]["steps"].get("video")
        if step is None:
            raise UserError(f"this {self.manifest['model']['variant']} export has no video step (video needs a "
                            "MiniCPM-V 4.5 export)")
        pre, hidden = self.manifest["preprocessing"], self.manifest["model"]["hidden_size"]
        out = []
        for start in range(0, len(groups), VISION_BATCH):
            batch = video_inputs(groups[start:start + VISION_BATCH], step["frames"], pre["patch_size"],
                                 pre["num_patches_per_side"], hidden, pad_to=self.max_patches)
            out.extend(self.backend.video(**self._floats(batch)).astype(np.float32))
        return out

    def _floats(self, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """Vision inputs as numpy, float ones in the export's dtype (position ids stay int64)."""
        return {k: v.numpy().astype(self.dtype) if v.is_floating_point() else v.numpy() for k, v in batch.items()}

    def prefill(self, embeds: np.ndarray) -> np.ndarray:
        """Feed the new tokens in chunks of `chunk`; the last one is padded to `chunk`, or only up to the prefill
        step's `min_tokens` when it takes a shorter T. Logits of the last real token."""
        logits = None
        for start in range(0, len(embeds), self.chunk):
            part = embeds[start:start + self.chunk]
            logits = self._run_llm(part, self.chunk if self.min_prefill is None else max(len(part), self.min_prefill))
        return logits

    def _embed(self, ids: list[int], scale: float) -> np.ndarray:
        return (self.table[np.asarray(ids, dtype=np.int64)].astype(np.float32) * scale).astype(np.float32)

    def _run_llm(self, embeds: np.ndarray, width: int) -> np.ndarray:
        """One graph call on `len(embeds)` new tokens padded to `width`; writes their K/V into the cache."""
        if self.state_spec:
            return self._run_state_step(embeds, width)
        n, past, ctx = len(embeds), self.cache_len, self.max_context
        hidden = embeds.shape[1]
        x = np.zeros((1, width, hidden), dtype=self.dtype)
        x[0, :n] = embeds
        positions = np.minimum(np.arange(past, past + width), ctx - 1).astype(np.int64)[None]
        # the cache slots the step gets: the filled ones (contiguous copies) or all max_context of them; a backend
        # that owns its cache gets the empty host arrays either way (as MiniCPMKit's Session.pastCache)
        slots = past if self.filled_slots else ctx
        keys, values = self.keys, self.values
        if self.filled_slots and not getattr(self.backend, "owns_cache", False):
            keys, values = (np.ascontiguousarray(c[:, :, :past]) for c in (keys, values))
        mask = np.full((1, 1, width, slots + width), NEG_INF, dtype=np.float32)
        mask[0, 0, :n, :past] = 0.0  # every real row sees the filled cache slots
        causal = np.triu(np.full((width, width), NEG_INF, dtype=np.float32), 1)
        mask[0, 0, :, slots:] = causal  # and the new tokens up to itself (pad rows too: no empty rows)
        logits, new_keys, new_values = self.backend.llm(
            inputs_embeds=x, position_ids=positions, attention_mask=np.maximum(mask, np.finfo(self.dtype).min)
            .astype(self.dtype), last_index=np.asarray([n - 1], dtype=np.int64), past_keys=keys, past_values=values)
        if new_keys is not None:  # stateful backends wrote their own cache
            self.keys[:, :, past:past + n] = new_keys[:, :, :n]
            self.values[:, :, past:past + n] = new_values[:, :, :n]
        self.cache_len = past + n
        return logits[0].astype(np.float32)

    def _run_state_step(self, embeds: np.ndarray, width: int) -> np.ndarray:
        """One call of a hybrid export's step: the new tokens padded to `width` (`valid_tokens` keeps the pad rows
        out of the linear layers' state), every state tensor in; then the state commits its update rule. A backend
        that `owns_state` gets no state inputs and returns the logits only; the host just counts the tokens."""
        n, cache = len(embeds), self.state
        x = np.zeros((1, width, embeds.shape[1]), dtype=self.dtype)
        x[0, :n] = embeds
        positions = self._step_positions(cache.length, width)  # M-RoPE rows (see place_positions)
        mask = cache.attention_mask(width).numpy()
        outputs = self.backend.llm(
            inputs_embeds=x, position_ids=np.ascontiguousarray(positions),
            attention_mask=np.maximum(mask, np.finfo(self.dtype).min).astype(self.dtype),
            last_index=np.asarray([n - 1], dtype=np.int64), valid_tokens=np.asarray([n], dtype=np.int64),
            **({name: tensor.numpy() for name, tensor in zip(self.state_spec.names, cache.inputs(), strict=True)}
               if cache.hold else {}))
        if cache.hold:
            cache.commit({t.name: torch.from_numpy(np.asarray(o)) for t, o in zip(self.state_spec.tensors, outputs[1:],
                                                                                   strict=True)}, n)
        else:
            cache.advance(n)
        self.cache_len = cache.length
        return outputs[0][0].astype(np.float32)
