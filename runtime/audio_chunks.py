"""The host side of the audio step: a clip's mel frames -> `AudioChunkStep` calls, one 1 s chunk at a time.

The schedule (as the eager reference `minicpm.audio_encoder.encode_chunked`, with fixed-size windows so one graph
serves every chunk):
- a chunk is 2C mel frames (C encoder frames, 50 = 1 s); it is encoded once its look-ahead frame has arrived (the
  convolutions read one frame past the chunk: 10 ms), or at once when the clip ends;
- each call gets the chunk's window (2 frames of left context, the chunk, the look-ahead; zero outside the clip's
  30 s piece), the conv2 padding mask, positions, the block-causal mask over the cache, and the cache;
- the cache holds the encoder K/V of the clip's earlier chunks in the P = 1500 slots of the encoder's position
  table. A 30 s piece fills it exactly (1500 / C chunks); the next mel frames start a new piece with an empty
  cache and positions from 0, exactly as upstream encodes recorded audio in 30 s pieces. So the cache never
  overflows and a live stream of any length runs in constant memory (a new piece every 30 s);
- a chunk of n encoder frames gives n // pool tokens (chunks are multiples of pool, so pooling windows never
  cross a chunk edge and the tokens equal the whole-clip encoding's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from minicpm.errors import UserError

NEG_INF = -1e30  # additive mask value, as the LLM schedule's


@dataclass(frozen=True)
class AudioStepSpec:
    """What the host needs of the audio step, read from the manifest (`schedule.steps.audio`, `audio_cache`)."""

    n_mels: int
    chunk: int  # C: encoder frames per chunk
    positions: int  # P: cache slots = the encoder's position table
    pool: int
    hidden: int  # LLM hidden size: the tokens' width
    cache_shape: tuple[int, int, int, int]  # [layers, heads, P, head_dim]

    @classmethod
    def from_manifest(cls, manifest: dict) -> AudioStepSpec:
        step, cache = manifest["schedule"]["steps"]["audio"], manifest["schedule"]["audio_cache"]
        return cls(manifest["preprocessing"]["audio"]["n_mels"], step["frames"], cache["positions"], step["pool"],
                   manifest["model"]["hidden_size"], tuple(cache["shape"]))

    @property
    def window(self) -> int:
        """Mel frames per call: 2 of left context, 2C of the chunk, 1 look-ahead."""
        return 2 * self.chunk + 3


AudioCall = Callable[..., tuple[np.ndarray, np.ndarray | None, np.ndarray | None]]


class AudioChunker:
    """One clip's encoder state between calls: the current 30 s piece's mel frames, how far they are encoded and
    the K/V cache (kept here unless the backend keeps it as graph state: `owns_cache`)."""

    def __init__(self, spec: AudioStepSpec, dtype: type = np.float32, owns_cache: bool = False):
        if spec.positions % spec.chunk or spec.chunk % spec.pool:
            raise UserError(f"audio step: chunks of {spec.chunk} encoder frames must divide the {spec.positions} "
                            f"positions and be a multiple of the pool {spec.pool}")
        self.spec, self.dtype, self.owns_cache = spec, dtype, owns_cache
        self.mel = np.zeros((spec.n_mels, 0), dtype=np.float32)
        self.start = 0  # first mel frame of the piece not yet encoded
        self.encoded = 0  # encoder frames of the piece in the cache (= the next position)
        shape = (0,) if owns_cache else spec.cache_shape
        self.keys = np.zeros(shape, dtype=dtype)
        self.values = np.zeros(shape, dtype=dtype)
        self.calls = 0

    def encode(self, mel: np.ndarray, final: bool, run: AudioCall) -> np.ndarray:
        """Append mel frames [n_mels, n] and encode every chunk that is ready (all of them when `final`) through
        `run` (a backend's `audio`). Returns the new tokens [t, H]; the clip's tokens so far equal the whole-clip
        encoding of its frames so far."""
        if mel.ndim != 2 or mel.shape[0] != self.spec.n_mels:
            raise UserError(f"audio features must be [{self.spec.n_mels}, frames], got {list(mel.shape)}")
        self.mel = np.concatenate([self.mel, mel.astype(np.float32)], axis=1)
        step, piece, out = 2 * self.spec.chunk, 2 * self.spec.positions, []
        while True:
            available, room = self.mel.shape[1] - self.start, piece - self.start
            full = min(step, room)
            if available <= 0:
                break
            if available > full or (available == full and (final or room <= step)):
                take = full  # a whole chunk: its look-ahead frame is here, or the piece ends with it
            elif final:
                take = available
            else:
                break
            ends = take == room or (final and take == available)
            out.append(self._call(take, ends, run))
            if take == room:  # the 30 s piece is complete: the next frames start a new one
                self.mel, self.start, self.encoded = self.mel[:, piece:], 0, 0
        return np.concatenate(out) if out else np.zeros((0, self.spec.hidden), dtype=np.float32)

    def _call(self, take: int, ends: bool, run: AudioCall) -> np.ndarray:
        spec, start, chunk = self.spec, self.start, self.spec.chunk
        window = np.zeros((spec.n_mels, spec.window), dtype=np.float32)
        lo, hi = start - 2, start + take + (0 if ends else 1)  # real frames: [max(lo, 0), hi)
        window[:, max(lo, 0) - lo: hi - lo] = self.mel[:, max(lo, 0):hi]
        conv_mask = np.zeros((1, 2 * chunk + 1), dtype=np.float32)  # row r: mel frame start - 1 + r
        conv_mask[0, (1 if start == 0 else 0): take + 1] = 1.0
        frames = (take - 1) // 2 + 1
        positions = np.minimum(self.encoded + np.arange(chunk), spec.positions - 1).astype(np.int64)
        mask = np.full((1, 1, chunk, spec.positions + chunk), NEG_INF, dtype=np.float32)
        mask[..., :self.encoded] = 0.0  # every earlier chunk of the piece
        mask[..., spec.positions:spec.positions + frames] = 0.0  # and this chunk's real frames
        floor = np.finfo(self.dtype).min
        tokens, new_keys, new_values = run(
            mel=window[None].astype(self.dtype), conv_mask=conv_mask.astype(self.dtype), position_ids=positions,
            attention_mask=np.maximum(mask, floor).astype(self.dtype), past_keys=self.keys, past_values=self.values)
        if new_keys is not None:  # stateful backends wrote their own cache
            self.keys[:, :, self.encoded:self.encoded + frames] = new_keys[:, :, :frames]
            self.values[:, :, self.encoded:self.encoded + frames] = new_values[:, :, :frames]
        self.encoded += frames
        self.start += take
        self.calls += 1
        return np.asarray(tokens, dtype=np.float32)[: frames // spec.pool]
