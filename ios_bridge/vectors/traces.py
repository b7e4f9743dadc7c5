"""Session traces: conversations run by `runtime.session.Session` on onnxruntime, every backend call recorded.

Swift's `TraceReplayTests` replays each trace through `MiniCPMKit.Session` with a backend that serves the
recorded outputs and checks every incoming call against the recorded inputs (kinds, order, shapes, positions,
masks, embeddings, the host KV cache), then the tokens, text and finish reason of every turn.

Layout: `out/export` (a tiny-minicpm-v-4 ONNX export, context 256; reused when it is already there and
verifies), one `out/<conversation>.json` per conversation, arrays beside them named by content (a vision batch
fed twice is stored once), and `out/sampler/*.json`: logits through the repetition penalty, bit for bit.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ios_bridge.vectors.common import array_ref, write_case
from minicpm.errors import UserError
from minicpm.generation import Sampler, SamplingConfig
from minicpm.image_processing import load_image
from runtime.backends import open_backend
from runtime.manifest import read_manifest
from runtime.session import ContextFull, Session

MODEL = "tiny-minicpm-v-4"
MAX_CONTEXT = 256
LONG_TEXT = "Blue sky and rain. " * 17  # 239 prompt tokens: the 256 slots fill after 18 new tokens


def _image(width: int, height: int, seed: int) -> Image.Image:
    """A small deterministic picture (smooth colours plus noise), so slicing and resizing see real content."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack([128 + 90 * np.sin(x / (7 + 3 * c) + seed) * np.cos(y / 11 - c) for c in range(3)], -1)
    rgb += np.random.default_rng(seed).normal(0, 12, rgb.shape)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise RuntimeError(f"traces: {message}")


def _user(*content) -> list[dict]:
    return [{"role": "user", "content": list(content)}]


def _conversations() -> dict[str, dict]:
    """name -> {chunk, on_context_full, events}; an event is ("turn", messages, sampling, expect) or ("reset",).
    `expect` is the finish reason the tiny model must reach, or "error" (ContextFull), checked when writing."""
    wide, small_a, small_b = _image(600, 400, 1), _image(24, 16, 2), _image(16, 24, 3)
    greedy = SamplingConfig(max_new_tokens=8)
    penalty = SamplingConfig(max_new_tokens=8, repetition_penalty=1.3)
    return {
        "sliced_image": {"chunk": 128, "events": [("turn", _user(wide, "What is this?"), greedy, "length")]},
        "two_images": {"chunk": 128, "events": [("turn", _user(small_a, small_b, "Compare them."), penalty,
                                                  "length")]},
        "text_only": {"chunk": 128, "events": [("turn", _user("Count to ten."), penalty, "length")]},
        "two_turns": {"chunk": 128, "events": [("turn", _user("Say yes."), greedy, "stop"),
                                               ("turn", _user(small_a, "And this picture?"), greedy, "length")]},
        "chunk7_pending": {"chunk": 7, "events": [
            ("turn", _user(small_a, "What is red?"), SamplingConfig(max_new_tokens=4), "length"),  # two_turns: one file
            ("turn", _user("Go on."), greedy, None),
            ("reset",),
            ("turn", _user("Why?"), SamplingConfig(max_new_tokens=3), "length")]},
        "context_full_stop": {"chunk": 128, "on_context_full": "stop", "events": [
            ("turn", _user(LONG_TEXT), SamplingConfig(max_new_tokens=64), "context_full"),
            ("reset",),
            # ends at slot 229; the next turn's padded chunk reaches past the context: clamped positions
            ("turn", _user("Blue sky and rain. " * 16), SamplingConfig(max_new_tokens=4), "length"),
            ("turn", _user("Hi"), greedy, "context_full"),
            ("turn", _user("Why?"), greedy, "error"),
            ("reset",),
            ("turn", _user("Sky"), SamplingConfig(max_new_tokens=2), "length")]},
        "context_full_error": {"chunk": 128, "on_context_full": "error", "events": [
            ("turn", _user(LONG_TEXT), SamplingConfig(max_new_tokens=64), "error"),
            ("reset",),
            ("turn", _user("Sky"), SamplingConfig(max_new_tokens=2), "length")]},
    }


class _Arrays:
    """Arrays written by content, so a batch seen twice (or in two traces) is one file."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, array) -> dict:
        a = np.ascontiguousarray(np.asarray(array))
        digest = hashlib.sha256(a.dtype.str.encode() + str(a.shape).encode() + a.tobytes()).hexdigest()[:20]
        return array_ref(self.folder, f"a{digest}", a)


class RecordingBackend:
    """Wraps the onnxruntime backend and records every call: inputs, outputs and the host cache slots written."""

    name = "onnxruntime"

    def __init__(self, inner, arrays: _Arrays, kv_shape: list[int]):
        self.inner, self.arrays, self.kv_shape = inner, arrays, kv_shape
        self.owns_cache = getattr(inner, "owns_cache", False)
        self.calls: list[dict] = []
        self.mirror = self._zeros()  # the cache as the recorded writes build it (checked against the real one)

    def _zeros(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.kv_shape, np.float32), np.zeros(self.kv_shape, np.float32)

    def reset(self) -> None:
        self.calls.append({"kind": "reset"})
        self.mirror = self._zeros()
        if hasattr(self.inner, "reset"):
            self.inner.reset()

    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        features = self.inner.vision(**inputs)
        self.calls.append({"kind": "vision", **{k: self.arrays(v) for k, v in inputs.items()},
                           "features": self.arrays(features)})
        return features

    def llm(self, **inputs: np.ndarray):
        slots = inputs["past_keys"].shape[2]  # the filled slots (kv_cache.slots = "filled") or all of them
        keys, values = self.mirror
        # The trace stores the writes, not the whole cache per call: prove they rebuild what Session passes.
        _check(np.array_equal(inputs["past_keys"], keys[:, :, :slots])
               and np.array_equal(inputs["past_values"], values[:, :, :slots]),
               f"call {len(self.calls)}: the past K/V are not what the recorded writes built")
        logits, new_keys, new_values = self.inner.llm(**inputs)
        start, count = int(inputs["position_ids"][0, 0]), int(inputs["last_index"][0]) + 1
        keys[:, :, start:start + count] = new_keys[:, :, :count]
        values[:, :, start:start + count] = new_values[:, :, :count]
        self.calls.append({
            "kind": "llm",
            **{k: self.arrays(inputs[k]) for k in ("inputs_embeds", "position_ids", "attention_mask", "last_index")},
            "past_shape": list(inputs["past_keys"].shape),
            "cache_write": {"start": start, "count": count},
            "logits": self.arrays(logits), "new_keys": self.arrays(new_keys), "new_values": self.arrays(new_values)})
        return logits, new_keys, new_values


class _RecordingPrompts:
    """The checkpoint's prompt builder, remembering the last turn it built (Session prepends the pending token)."""

    def __init__(self, inner):
        self.inner, self.last = inner, None

    def build(self, *args, **kwargs):
        self.last = self.inner.build(*args, **kwargs)
        return self.last

    def build_turn(self, *args, **kwargs):
        self.last = self.inner.build_turn(*args, **kwargs)
        return self.last


def _pieces(tokenizer, ids: list[int]) -> list[list]:
    """What TextStreamer emits: [tokens put so far, text] per piece (0 tokens: the final flush in `end`)."""
    out, emitted = [], 0
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if not text.endswith("\ufffd") and len(text) > emitted:
            out.append([n, text[emitted:]])
            emitted = len(text)
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if len(text) > emitted:
        out.append([0, text[emitted:]])
    return out


def _sampling(c: SamplingConfig) -> dict:
    return {"greedy": c.greedy, "temperature": c.temperature, "top_p": c.top_p, "top_k": c.top_k,
            "repetition_penalty": c.repetition_penalty, "seed": c.seed, "max_new_tokens": c.max_new_tokens}


def _turn(session: Session, backend: RecordingBackend, prompts: _RecordingPrompts, messages, sampling,
          expect) -> dict:
    pending, first_call = list(session.pending), len(backend.calls)
    history_before = len(session.history.input_ids)
    pieces: list[str] = []
    event: dict = {"kind": "turn", "pending_before": pending, "sampling": _sampling(sampling)}
    try:
        result = session.ask(messages, sampling, pieces.append)
        event.update(token_ids=result.token_ids, text=result.text, finish_reason=result.stats["finish_reason"],
                     stats_keys=sorted(result.stats), error=None,
                     stats={k: result.stats[k] for k in ("prompt_tokens", "new_tokens", "images", "slices",
                                                         "context_tokens", "finish_reason", "backend")},
                     pieces=_pieces(session.checkpoint.tokenizer, result.token_ids),
                     decoded=[session.checkpoint.tokenizer.decode(result.token_ids[:n], skip_special_tokens=True)
                              for n in range(1, len(result.token_ids) + 1)])
        _check("".join(pieces) == result.text == "".join(p for _, p in event["pieces"]),
               f"streamed pieces {pieces} do not make the text {result.text!r}")
    except ContextFull as e:
        event.update(token_ids=None, text=None, finish_reason="error", error=str(e))
    built = prompts.last
    _check(expect is None or event["finish_reason"] == expect,
           f"{messages}: finish {event['finish_reason']}, the trace needs {expect} (did the tiny model change?)")
    calls = range(first_call, len(backend.calls))
    grids = iter([list(im.sliced.grid) if im.sliced.grid else None for im in built.images])
    # the messages as ChatPrompt takes them: text items, and images by their slice grid
    event["messages"] = [{"role": m["role"], "content": [{"text": c} if isinstance(c, str) else {"grid": next(grids)}
                                                         for c in m["content"]]} for m in messages]
    event.update(built_ids=built.input_ids, built_bounds=[list(b) for b in built.image_bounds],
                 images=len(built.images), slices=len(built.pixel_values), prompt_ids=pending + built.input_ids,
                 image_bounds=[[s + len(pending), e + len(pending)] for s, e in built.image_bounds],
                 history_ids=list(session.history.input_ids), history_before=history_before,
                 history_bounds=[list(b) for b in session.history.image_bounds],
                 cache_len=session.cache_len, pending_after=list(session.pending),
                 history_images=len(session.history.images),
                 calls=[first_call, len(backend.calls)],
                 vision_calls=[i for i in calls if backend.calls[i]["kind"] == "vision"])
    keys, values = backend.mirror
    _check(np.array_equal(session.keys, keys) and np.array_equal(session.values, values),
           "the session's KV cache is not what the recorded writes built")
    prompts.last = None
    return event


def _conversation(folder: Path, export: Path, name: str, spec: dict, arrays: _Arrays) -> dict:
    manifest = read_manifest(export)
    inner = open_backend("onnxruntime", export, manifest, threads=1)
    backend = RecordingBackend(inner, arrays, manifest["schedule"]["kv_cache"]["shape"])
    session = Session(export, backend, on_context_full=spec.get("on_context_full"))
    session.chunk = spec["chunk"]
    prompts = _RecordingPrompts(session.checkpoint.prompts)
    session.checkpoint.prompts = prompts
    events = []
    for event in spec["events"]:
        if event[0] == "reset":
            session.reset()
            events.append({"kind": "reset"})
        else:
            events.append(_turn(session, backend, prompts, *event[1:]))
    return {"name": name, "model": MODEL, "export": export.relative_to(folder).as_posix(), "chunk": session.chunk,
            "on_context_full": session.on_context_full, "max_context": session.max_context,
            "stop_ids": manifest["tokenizer"]["stop_ids"], "events": events, "calls": backend.calls}


def _export(out: Path) -> Path:
    """out/export: reused when it verifies and has the trace context, else exported anew (~15 s)."""
    export = out / "export"
    try:
        if read_manifest(export)["schedule"]["max_context"] == MAX_CONTEXT:
            return export
    except (UserError, OSError, KeyError):
        pass
    if export.exists():
        shutil.rmtree(export)
    command = [sys.executable, "-m", "export.onnx", "--model", MODEL, "--out", str(export),
               "--max-context", str(MAX_CONTEXT)]
    subprocess.run(command, check=True, cwd=Path(__file__).resolve().parents[2], stdout=subprocess.DEVNULL)
    return export


def _sampler_cases(out: Path) -> None:
    """Repetition penalty and greedy choice on logits with ties, negatives and repeated ids: bit-exact cases."""
    rng = np.random.default_rng(7)
    for i, (penalty, previous) in enumerate([(1.3, [3, 3, 7, 0, 18]), (0.7, [1, 2, 5, 9]), (1.02, list(range(12))),
                                             (1.0, [4]), (2.5, [])]):
        logits = rng.normal(0, 3, 20).astype(np.float32)
        logits[11] = logits[12] = logits.max() + 0.5  # a tie: the first maximum wins
        config = SamplingConfig(repetition_penalty=penalty)
        processed = torch.from_numpy(logits.copy())
        if penalty != 1.0 and previous:
            idx = torch.tensor(sorted(set(previous)))
            scores = processed[idx]
            processed[idx] = torch.where(scores < 0, scores * penalty, scores / penalty)
        write_case(out, f"penalty{i}", {
            "logits": logits.tolist(), "previous": previous, "repetition_penalty": penalty,
            "processed_bits": processed.numpy().view(np.uint32).tolist(),
            "greedy": Sampler(config)(torch.from_numpy(logits), previous)})


def write(out: Path, models: list[str], images: list[Path], prompts: list[str]) -> None:
    """Export (or reuse) the tiny model, then record every conversation of `_conversations` into `out`, plus one
    per given image (with "What is this?") and per given prompt. `models` is ignored: traces need one export."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.json"), *out.glob("*.bin"), *(out / "sampler").glob("*.json")]:
        stale.unlink()
    export = _export(out)
    arrays = _Arrays(out)
    extra = {f"user_image{i}": {"chunk": 128, "events": [
        ("turn", _user(load_image(p), "What is this?"), SamplingConfig(max_new_tokens=8), None)]}
        for i, p in enumerate(images)}
    extra |= {f"user_prompt{i}": {"chunk": 128, "events": [("turn", _user(p), SamplingConfig(max_new_tokens=8), None)]}
              for i, p in enumerate(prompts)}
    for name, spec in (_conversations() | extra).items():
        write_case(out, name, _conversation(out, export, name, spec, arrays))
    _sampler_cases(out / "sampler")
