"""Live-microphone mel features for MiniCPM-o, as upstream's `StreamingMelProcessorExact` computes them.

Upstream (`processing_minicpmo.py` of MiniCPM-o 4.5, with the duplex settings its live paths use: first chunk
1035 ms aligned down to 1030 ms, then 1 s chunks, 30 s sliding window with a 10 s stride) works at processing
points, the buffer lengths its callers feed: 16 480 samples, then every 16 000 more. At each point it
- drops the oldest 10 s when the buffer (its window) has reached 30 s;
- computes the log-mel of the whole window with no 30 s zero padding (torch's reflect padding at both ends);
- normalises it with the fixed floor -10 when the window is under 5 s, else with the dynamic floor
  `max(window's mel) - 8` (Whisper's rule over the window so far), then `(x + 4) / 4`;
- emits frames whose STFT window lies inside the buffer (stable: `160 t + 200 <= n`): a 1 s core of 100 frames
  plus `cnn_redundancy_ms / 10` (2) frames of context on each side, which the next chunk repeats.
`flush()` emits the rest from the final window the same way.

`StreamingMel` keeps that arithmetic and emits each frame once: at every point the frames that just became
stable (100 per point, 102 at the first), each with the value of upstream's first emission of it; `flush()`
gives the rest, `ceil(n / 160)` frames in all (`mel_frames(n)`; upstream ends one frame short when n % 160 != 0,
its last STFT frame dropped; we keep it). Points are sample counts, so the frames do not depend on how the
samples are split into `feed()` calls. Streams of any length work (the sliding window), in bounded memory.

What equals what, exactly (bit for bit; tests/test_audio_streaming.py):
- a frame emitted while the window is under 5 s equals the recorded path's `log_mel(samples, log_floor=-10)`
  frame (the floor -10 is the log's own clamp, and a stable frame sees no padding), except the last 1 or 2
  frames of a stream flushed under 5 s (160 t + 200 > n): reflect padding here, zeros in the recorded path;
- a frame emitted at a point (or flush) whose window is 5 s or more equals transformers'
  `WhisperFeatureExtractor()(window, padding=False)` frame, the window being the stream's samples up to that
  point from its last 10 s slide (from 0 until the stream reaches 30 s); the extra last frame excepted (it
  drops it). Where the floor clips, that is not the recorded path's value.
- against upstream itself, fed its own chunk sizes: our frames are its emissions with the repeats removed, the
  first copy kept, bit for bit (checked offline on 0.7-62 s clips). Its later copies (each point re-emits frames
  100 c - 2 .. 100 c + 1 with the new point's floor) differ where the floor moved: at the 5 s switch (frames
  398-401, up to 0.6 on speech with pauses), by < 0.01 after (the window's max growing).
"""

from __future__ import annotations

import math

import numpy as np

from minicpm import audio as A
from minicpm.errors import UserError

FIRST_POINT = 16480  # upstream's first chunk: 1035 ms aligned down to the hop, 103 frames of which 102 stable
POINT_STEP = 16000  # then one point per 1 s chunk (100 frames)
SLIDE_TRIGGER = A.CHUNK_SAMPLES  # upstream slides its window once it holds 30 s ...
SLIDE_STRIDE = 10 * A.SAMPLE_RATE  # ... by 10 s (a whole number of hops, so frames keep their global index)


def stable_frames(samples: int) -> int:
    """Frames whose whole STFT window lies inside a buffer of `samples` (centre + n_fft / 2 <= n)."""
    return 0 if samples < A.N_FFT // 2 else (samples - A.N_FFT // 2) // A.HOP_LENGTH + 1


class StreamingMel:
    """Samples in as they arrive (16 kHz mono), upstream's live log-mel frames [80, k] out, each frame once.

    `log_floor_seconds`: the window length under which the fixed floor -10 holds (upstream: 5 s)."""

    def __init__(self, log_floor_seconds: float = 5.0):
        if isinstance(log_floor_seconds, bool) or not isinstance(log_floor_seconds, int | float) \
                or not math.isfinite(log_floor_seconds) or log_floor_seconds < 0:
            raise UserError(f"log_floor_seconds must be a finite number >= 0, got {log_floor_seconds!r}")
        self._switch = round(log_floor_seconds * A.SAMPLE_RATE)
        self._buffer = np.zeros(0, dtype=np.float32)  # [:fill]: upstream's window and the samples since its point
        self._fill = 0  # grown by doubling, so feeding 10 ms at a time costs no copy of the whole buffer
        self._start = 0  # stream index of the buffer's first sample (a multiple of the hop)
        self._samples = 0
        self._emitted = 0
        self._points = 0  # processing points passed
        self._closed = False

    @property
    def samples(self) -> int:
        """Samples fed so far."""
        return self._samples

    @property
    def frames_emitted(self) -> int:
        """Frames returned so far."""
        return self._emitted

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Append samples (float, or int16 / int32 PCM; any count, 0 too); returns the newly stable frames."""
        if self._closed:
            raise UserError("this live audio stream was flushed; start a new StreamingMel for the next one")
        if not isinstance(samples, np.ndarray):
            raise UserError(f"live audio must be a numpy array of samples, got {type(samples).__name__}")
        if samples.ndim != 1:
            raise UserError(f"live audio takes mono samples [n] at 16 kHz, got shape {tuple(samples.shape)}")
        data = A._array_samples(samples)[:, 0]
        if not np.isfinite(data).all():
            raise UserError("live audio holds NaN or infinite samples")
        self._append(data)
        out = []
        while (point := FIRST_POINT + self._points * POINT_STEP) <= self._samples:
            self._points += 1
            self._slide(point)
            out.append(self._emit(point, stable_frames(point)))
        return np.concatenate(out, axis=1) if out else np.zeros((A.N_MELS, 0), dtype=np.float32)

    def flush(self) -> np.ndarray:
        """The stream ended: the remaining frames, so that `mel_frames(samples)` were emitted in all. Later calls
        return no frames; `feed()` refuses."""
        if self._closed or self._samples == 0:
            self._closed = True
            return np.zeros((A.N_MELS, 0), dtype=np.float32)
        self._closed = True
        last_point = FIRST_POINT + (self._points - 1) * POINT_STEP if self._points else 0
        if self._samples > last_point:  # the samples after the last point: upstream's last, partial call
            self._slide(self._samples)
        return self._emit(self._samples, A.mel_frames(self._samples))

    def _append(self, data: np.ndarray) -> None:
        need = self._fill + data.size
        if need > self._buffer.size:
            grown = np.empty(max(need, 2 * self._buffer.size, 4 * POINT_STEP), dtype=np.float32)
            grown[:self._fill] = self._buffer[:self._fill]
            self._buffer = grown
        self._buffer[self._fill:need] = data
        self._fill, self._samples = need, self._samples + data.size

    def _slide(self, end: int) -> None:
        if end - self._start >= SLIDE_TRIGGER:  # upstream drops the window's oldest 10 s
            self._buffer[:self._fill - SLIDE_STRIDE] = self._buffer[SLIDE_STRIDE:self._fill]
            self._fill, self._start = self._fill - SLIDE_STRIDE, self._start + SLIDE_STRIDE

    def _emit(self, end: int, upto: int) -> np.ndarray:
        """Frames [emitted, upto) of the window that ends at sample `end`, normalised as upstream at that point."""
        window = self._buffer[:end - self._start]
        fixed = window.size < self._switch
        if window.size < A.N_FFT:  # only a stream flushed under 25 ms: upstream refuses it, the recorded path does not
            frames = A.log_mel(window, A.STREAMING_LOG_FLOOR if fixed else None)
        else:
            spec = A.buffer_log_spec(window)
            floor = A.STREAMING_LOG_FLOOR if fixed else spec[:, :window.size // A.HOP_LENGTH].max() - A.DYNAMIC_RANGE_DB
            frames = (np.maximum(spec, np.float32(floor)) + np.float32(4.0)) / np.float32(4.0)
        base = self._start // A.HOP_LENGTH
        out = frames[:, self._emitted - base:upto - base]
        self._emitted = upto
        return np.ascontiguousarray(out, dtype=np.float32)
