"""Audio input for MiniCPM-o: file or array -> 16 kHz mono -> Whisper log-mel features and token counts.

Exactly as upstream prepares audio (`processing_minicpmo.py`, `MiniCPMAAudioProcessor`, `MiniCPMOProcessor`):
- loading as upstream's examples do with `librosa.load(path, sr=16000, mono=True)`: soundfile decodes to
  float32, channels are averaged, other rates are resampled with soxr at HQ quality (librosa's default
  resampler) and the result is cut or zero-padded to `ceil(n * 16000 / rate)` samples;
- features as transformers' `WhisperFeatureExtractor` computes them (torch path: hann window, n_fft 400,
  hop 160, 80 slaney mel bins up to 8 kHz, power 2, log10 floored at 1e-10): each clip zero-padded to
  30 s, the last STFT frame dropped, then the log-norm rule (dynamic floor `max - 8`, or upstream's
  fixed streaming floor -10) and `(x + 4) / 4`; the first `ceil(n / 160)` frames are kept;
- clips over 30 s are cut every 30 s and each piece gets its own features (own padding, own max);
- tokens: `f = ceil(n / 160)`, `c = (f - 1) // 2 + 1` (stride-2 conv), `t = (c - pool) // pool + 1`
  (average pooling, `audio_pool_step`); streaming placeholders hold one span per 1 s chunk.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minicpm.errors import UserError

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 80
CHUNK_SECONDS = 30  # upstream encodes at most 30 s per piece (the encoder's 1500 positions)
CHUNK_SAMPLES = CHUNK_SECONDS * SAMPLE_RATE
CHUNK_FRAMES = CHUNK_SAMPLES // HOP_LENGTH  # 3000
DYNAMIC_RANGE_DB = 8.0  # Whisper's rule: floor at max - 8 (log10 units)
STREAMING_LOG_FLOOR = -10.0  # upstream's fixed floor for live input, which cannot see the whole clip
MAX_SECONDS = 600.0  # longest accepted clip: 10 minutes (6000 tokens at pool 5, 15000 at pool 2)
MIN_RATE, MAX_RATE = 1000, 768000  # accepted input sample rates
STREAM_CHUNK_MEL_FRAMES = 100  # upstream's 1 s streaming chunk: int(chunk_length * 100) mel frames
DEFAULT_POOL = {"minicpm-o-4.5": 5, "minicpm-o-2.6": 2}  # audio_pool_step when config.json omits it


@dataclass
class AudioInputs:
    """One clip ready for the model: log-mel features [80, f] (float32; clips over 30 s are their 30 s pieces'
    features side by side, a piece boundary every 3000 frames) and its length in samples, seconds, LLM tokens
    and 30 s pieces."""

    features: np.ndarray
    samples: int
    seconds: float
    tokens: int
    chunks: int

    def chunk_features(self) -> list[np.ndarray]:
        """The features of each 30 s piece, as upstream encodes them (one Whisper pass each)."""
        return [self.features[:, i:i + CHUNK_FRAMES] for i in range(0, self.features.shape[1], CHUNK_FRAMES)]

    def summary(self) -> dict:
        return {"seconds": self.seconds, "mel_frames": int(self.features.shape[1]), "chunks": self.chunks,
                "tokens": self.tokens}


# ----- token arithmetic -------------------------------------------------------------------------------------


def mel_frames(samples: int) -> int:
    """Mel frames kept for `samples` at 16 kHz: ceil(n / 160)."""
    return -(-samples // HOP_LENGTH)


def audio_tokens(samples: int, pool: int) -> int:
    """LLM tokens of one clip: mel frames -> stride-2 conv -> average pooling by `pool`."""
    conv = (mel_frames(samples) - 1) // 2 + 1
    return max(0, (conv - pool) // pool + 1)


def chunk_tokens(pool: int) -> int:
    """Tokens of one full 1 s streaming chunk: 10 at pool 5 (o-4.5), 25 at pool 2 (o-2.6)."""
    conv = (STREAM_CHUNK_MEL_FRAMES - 1) // 2 + 1
    return (conv - pool) // pool + 1


def placeholder_lengths(tokens: int, pool: int, stream_input: bool) -> list[int]:
    """`<unk>` counts of a clip's placeholder spans: one span of all tokens (recorded), or one per 1 s chunk
    with the last one shorter (streaming)."""
    if not stream_input:
        return [tokens]
    per = chunk_tokens(pool)
    return [min(per, tokens - start) for start in range(0, tokens, per)]


def min_samples(pool: int) -> int:
    """The shortest clip that still gives one token."""
    return (2 * pool - 2) * HOP_LENGTH + 1  # pool encoder frames need 2 * pool - 1 mel frames


def audio_pool_step(config) -> int:
    """`audio_pool_step` of a MiniCPM-o config (config.json's; 5 for o-4.5, 2 for o-2.6)."""
    value = getattr(config, "audio_pool_step", None) or config.raw.get("audio_pool_step",
                                                                       DEFAULT_POOL.get(config.variant.name))
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 50:
        raise UserError(f"config.json: audio_pool_step must be an integer in 1..50, got {value!r}")
    return value


# ----- waveform -----------------------------------------------------------------------------------------------


def load_waveform(source: str | os.PathLike | np.ndarray, sample_rate: int | None = None) -> np.ndarray:
    """A file (WAV, FLAC, OGG, ... through soundfile) or an array -> validated 16 kHz mono float32 samples.

    Arrays are mono [n] or multi-channel [n, channels] (soundfile's layout; [channels, n] is accepted when the
    first axis is the short one, at most 8), at `sample_rate` (default 16000)."""
    if isinstance(source, np.ndarray):
        data, rate, name = _array_samples(source), SAMPLE_RATE if sample_rate is None else sample_rate, "audio array"
    elif isinstance(source, str | os.PathLike):
        if sample_rate is not None:
            raise UserError("sample_rate is only for arrays: a file says its own rate")
        data, rate = _read_file(Path(source))
        name = str(source)
    else:
        raise UserError(f"audio must be a file path or a numpy array, got {type(source).__name__}")
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or not MIN_RATE <= rate <= MAX_RATE:
        raise UserError(f"{name}: sample rate {rate!r} is not an integer in {MIN_RATE}..{MAX_RATE} Hz")
    if data.shape[0] == 0:
        raise UserError(f"{name}: the audio has no samples (zero length)")
    if data.shape[0] > MAX_SECONDS * rate:
        raise UserError(f"{name}: {data.shape[0] / rate:.1f} s of audio is over the {MAX_SECONDS:g} s limit")
    if not np.isfinite(data).all():
        raise UserError(f"{name}: the audio holds NaN or infinite samples")
    return resample(downmix(data), int(rate))


def downmix(data: np.ndarray) -> np.ndarray:
    """[n, channels] -> [n]: the channel average, as librosa's `to_mono` (float32 mean)."""
    return data[:, 0].copy() if data.shape[1] == 1 else np.mean(data, axis=1, dtype=np.float32)


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """Mono float32 at `rate` -> 16 kHz with soxr HQ, trimmed or zero-padded to ceil(n * 16000 / rate) samples
    (librosa.resample's defaults: res_type soxr_hq, fix=True)."""
    samples = np.ascontiguousarray(samples, dtype=np.float32)
    if rate == SAMPLE_RATE:
        return samples
    import soxr  # noqa: PLC0415 (only needed for other rates)

    out = soxr.resample(samples, rate, SAMPLE_RATE, quality="HQ")
    n = math.ceil(samples.shape[0] * SAMPLE_RATE / rate)
    return np.pad(out, (0, max(0, n - out.shape[0])))[:n].astype(np.float32, copy=False)


def _array_samples(array: np.ndarray) -> np.ndarray:
    if array.dtype.kind == "f":
        data = array.astype(np.float32, copy=False)
    elif array.dtype in (np.int16, np.int32):  # PCM: scaled as soundfile reads it
        data = array.astype(np.float32) / float(2 ** (8 * array.dtype.itemsize - 1))
    else:
        raise UserError(f"audio array must hold floats (or int16 / int32 PCM), got dtype {array.dtype}")
    if data.ndim == 1:
        return data[:, None]
    if data.ndim != 2:
        raise UserError(f"audio array must be [samples] or [samples, channels], got shape {tuple(array.shape)}")
    if data.shape[0] <= 8 < data.shape[1]:  # [channels, samples] (librosa's layout)
        data = data.T
    return data


def _read_file(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf  # noqa: PLC0415

    if not path.is_file():
        raise UserError(f"{path}: no such audio file")
    try:
        with sf.SoundFile(str(path)) as f:
            if f.frames > MAX_SECONDS * f.samplerate:  # refused before decoding it all
                raise UserError(f"{path}: {f.frames / f.samplerate:.1f} s of audio is over the {MAX_SECONDS:g} s "
                                "limit")
            fmt, rate = f.format, f.samplerate
            data = f.read(dtype="float32", always_2d=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 (libsndfile's message names what is wrong with the file)
        detail = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise UserError(f"{path}: cannot read the audio ({detail})") from None
    if fmt in ("WAV", "WAVEX") and _wav_truncated(path):
        raise UserError(f"{path}: truncated audio file (its data chunk is shorter than its header says)")
    return data, rate


def _wav_truncated(path: Path) -> bool:
    """libsndfile reads a cut WAV silently: compare the RIFF data chunk's declared size with the bytes present."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return False  # RF64 / BW64 keep their sizes elsewhere; libsndfile checked the rest
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                return chunk_size not in (0, 0xFFFFFFFF) and pos + 8 + chunk_size > size  # 0 / ~0: length unknown
            pos += 8 + chunk_size + (chunk_size & 1)
    return False


# ----- features -----------------------------------------------------------------------------------------------


@functools.cache
def _mel_filters():
    import torch  # noqa: PLC0415
    from transformers.audio_utils import mel_filter_bank  # noqa: PLC0415

    filters = mel_filter_bank(num_frequency_bins=1 + N_FFT // 2, num_mel_filters=N_MELS, min_frequency=0.0,
                              max_frequency=8000.0, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(filters).to(torch.float32), torch.hann_window(N_FFT)


def log_mel(samples: np.ndarray, log_floor: float | None = None) -> np.ndarray:
    """Log-mel features [80, ceil(n / 160)] of 16 kHz mono samples, at most 30 s, zero-padded to 30 s first.

    `log_floor`: None for the dynamic floor `max - 8` (the recorded path), or a fixed floor in log10 units
    (upstream's streaming value is -10)."""
    import torch  # noqa: PLC0415

    n = int(samples.shape[0])
    if not 0 < n <= CHUNK_SAMPLES:
        raise UserError(f"log_mel takes 1..{CHUNK_SAMPLES} samples, got {n}")
    filters, window = _mel_filters()
    wave = torch.zeros(1, CHUNK_SAMPLES, dtype=torch.float32)
    wave[0, :n] = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2  # the last frame is dropped, as Whisper does
    log_spec = torch.clamp(filters.T @ power, min=1e-10).log10()
    floor = log_spec.max() - DYNAMIC_RANGE_DB if log_floor is None else torch.tensor(float(log_floor))
    log_spec = (torch.maximum(log_spec, floor) + 4.0) / 4.0
    return log_spec[0, :, :mel_frames(n)].numpy()


def buffer_log_spec(samples: np.ndarray) -> np.ndarray:
    """Un-normalised log10 mel power [80, ceil(n / 160)] of a live buffer as it stands (400..480000 samples).

    As upstream's streaming processor computes it (`padding=False`): no 30 s zero padding, so the centred frames
    at both ends see torch's reflect padding of the buffer itself. The STFT's last frame is kept only when it
    covers samples no other frame starts on (n % 160 != 0), so there are as many frames as `mel_frames(n)`."""
    import torch  # noqa: PLC0415

    n = int(samples.shape[0])
    if not N_FFT <= n <= CHUNK_SAMPLES:
        raise UserError(f"buffer_log_spec takes {N_FFT}..{CHUNK_SAMPLES} samples, got {n}")
    filters, window = _mel_filters()
    wave = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))[None]
    stft = torch.stft(wave, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = (stft[..., :mel_frames(n)].abs() ** 2).contiguous()
    return torch.clamp(filters.T @ power, min=1e-10).log10()[0].numpy()


def audio_features(samples: np.ndarray, log_floor: float | None = None) -> np.ndarray:
    """Features of a whole clip: its 30 s pieces' `log_mel` side by side ([80, ceil(n / 160)])."""
    pieces = [log_mel(samples[i:i + CHUNK_SAMPLES], log_floor) for i in range(0, samples.shape[0], CHUNK_SAMPLES)]
    return np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]


def process_audio(source: str | os.PathLike | np.ndarray, pool: int, sample_rate: int | None = None,
                  log_floor: float | None = None) -> AudioInputs:
    """A file or array -> AudioInputs for a model with `audio_pool_step` = `pool`; clips too short for a single
    token are refused."""
    samples = load_waveform(source, sample_rate)
    n = int(samples.shape[0])
    tokens = audio_tokens(n, pool)
    if tokens == 0:
        name = "audio array" if isinstance(source, np.ndarray) else str(source)
        raise UserError(f"{name}: audio too short: {n / SAMPLE_RATE:.3f} s gives no audio token (at least "
                        f"{min_samples(pool) / SAMPLE_RATE:.3f} s needed)")
    return AudioInputs(audio_features(samples, log_floor), n, n / SAMPLE_RATE, tokens, -(-n // CHUNK_SAMPLES))
