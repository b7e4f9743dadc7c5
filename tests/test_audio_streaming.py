"""Live-microphone mel (minicpm.audio_streaming): upstream's processing points, frame counts, independence from how
the samples are split, equality with the recorded path under 5 s and with transformers' Whisper extractor on the
live window after 5 s, the 30 s sliding window, stability and bad input."""

from __future__ import annotations

import re

import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from minicpm import audio as A
from minicpm.audio_streaming import FIRST_POINT, POINT_STEP, StreamingMel, stable_frames
from minicpm.errors import UserError

SR = 16000
FE = WhisperFeatureExtractor()


def speech(n: int, seed: int = 0) -> np.ndarray:
    """n samples of voiced-like sound: gliding harmonics, syllables and near-silent pauses (so the floor bites)."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    phase = 2 * np.pi * np.cumsum(rng.uniform(100, 220) * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t))) / SR
    envelope = np.sin(np.pi * 3.0 * t) ** 2 * (np.sin(2 * np.pi * 0.25 * t) > -0.7)
    voice = sum(np.sin(k * phase) / k for k in range(1, 7)) * envelope
    return (0.3 * voice + 1e-4 * rng.standard_normal(n)).astype(np.float32)


def stream(x: np.ndarray, pieces: list[int] | None = None, **kwargs) -> np.ndarray:
    mel = StreamingMel(**kwargs)
    cuts = np.cumsum([0, *(pieces or [x.size])])
    out = [mel.feed(x[a:b]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return np.concatenate([*out, mel.feed(x[cuts[-1]:]), mel.flush()], axis=1)


def live_whisper(window: np.ndarray) -> np.ndarray:
    """transformers' extractor as upstream's live processor calls it: the buffer as it is, Whisper's max - 8."""
    return FE(window, sampling_rate=SR, padding=False, return_tensors="np")["input_features"][0]


def reflect_last_frame(x: np.ndarray) -> np.ndarray:
    """Independent numpy log10 mel of the STFT frame centred at 160 * (n // 160), torch's reflect padding."""
    padded = np.pad(x.astype(np.float64), A.N_FFT // 2, mode="reflect")
    start = (x.size // A.HOP_LENGTH) * A.HOP_LENGTH
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(A.N_FFT) / A.N_FFT)  # periodic hann, as torch's
    power = np.abs(np.fft.rfft(padded[start:start + A.N_FFT] * window)) ** 2
    return np.log10(np.maximum(FE.mel_filters.T @ power, 1e-10))


def points(n: int) -> list[int]:
    return list(range(FIRST_POINT, n + 1, POINT_STEP))


@pytest.fixture(scope="module")
def clip12():
    x = speech(12 * SR + 77, seed=3)
    return x, stream(x)


# ----- counts and schedule ---------------------------------------------------------------------------------


def test_frame_count_after_flush_is_mel_frames_for_many_lengths():
    rng = np.random.default_rng(0)
    lengths = [1, 150, 200, 399, 400, 401, 1600, FIRST_POINT - 1, FIRST_POINT, FIRST_POINT + 1, 5 * SR,
               *rng.integers(1600, 12 * SR, 12)]
    for n in lengths:
        mel = StreamingMel()
        frames = np.concatenate([mel.feed(speech(int(n), seed=int(n))), mel.flush()], axis=1)
        assert frames.shape == (80, A.mel_frames(int(n))) and frames.dtype == np.float32, n
        assert mel.frames_emitted == A.mel_frames(int(n)) and mel.samples == n
        assert np.isfinite(frames).all()


def test_frames_are_released_at_upstreams_points():
    x, mel = speech(FIRST_POINT + 2 * POINT_STEP), StreamingMel()
    assert mel.feed(x[:0]).shape == (80, 0)
    assert mel.feed(x[:FIRST_POINT - 1]).shape == (80, 0)  # 1029.9 ms: the first point not reached
    assert mel.feed(x[FIRST_POINT - 1:FIRST_POINT]).shape == (80, 102)  # 1030 ms: the frames stable then
    assert mel.feed(x[FIRST_POINT:FIRST_POINT + POINT_STEP - 1]).shape == (80, 0)
    assert mel.feed(x[FIRST_POINT + POINT_STEP - 1:]).shape == (80, 200)  # two points in one call
    assert mel.frames_emitted == stable_frames(x.size) == 302
    assert mel.flush().shape == (80, A.mel_frames(x.size) - 302)
    assert mel.flush().shape == (80, 0) and StreamingMel().flush().shape == (80, 0)


def test_frames_do_not_depend_on_how_the_samples_are_split(clip12):
    x, whole = clip12
    assert whole.shape == (80, A.mel_frames(x.size))
    np.testing.assert_array_equal(stream(x, [160] * (x.size // 160)), whole)
    rng = np.random.default_rng(1)
    pieces = [int(p) for p in rng.choice([0, 1, 7, 160, 333, 4000, 16000, 20011], 400)]
    np.testing.assert_array_equal(stream(x, pieces), whole)


# ----- values ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [9000, 3 * SR + 123, 5 * SR - 1])
def test_under_5s_frames_equal_the_recorded_fixed_floor_path_but_the_reflected_tail(n):
    x = speech(n, seed=n)
    ours, recorded, stable = stream(x), A.log_mel(x, A.STREAMING_LOG_FLOOR), stable_frames(n)
    np.testing.assert_array_equal(ours[:, :stable], recorded[:, :stable])  # bit for bit
    tail = ours[:, stable:]
    assert 1 <= tail.shape[1] <= 2 and np.abs(tail - recorded[:, stable:]).max() > 1e-3  # zeros vs reflect
    expected = (np.maximum(reflect_last_frame(x), -10.0) + 4) / 4
    np.testing.assert_allclose(ours[:, -1], expected, atol=1e-5)


def test_after_5s_each_point_normalises_its_window_with_whispers_dynamic_rule(clip12):
    x, ours = clip12
    recorded = A.log_mel(x, A.STREAMING_LOG_FLOOR)
    np.testing.assert_array_equal(ours[:, :402], recorded[:, :402])  # points 0-3: windows under 5 s
    done = 402
    for point in points(x.size)[4:]:  # 80 480 samples and on: the dynamic floor over the window so far
        upto = stable_frames(point)
        np.testing.assert_array_equal(ours[:, done:upto], live_whisper(x[:point])[:, done:upto])
        done = upto
    final = live_whisper(x)  # flush: the whole stream, its last STFT frame dropped by transformers
    np.testing.assert_array_equal(ours[:, done:x.size // 160], final[:, done:])
    floor = (reflect_last_frame(x)[None], final.min())
    np.testing.assert_allclose(ours[:, -1], np.maximum((floor[0][0] + 4) / 4, floor[1]), atol=1e-5)
    clipped = ours[:, 402:] != recorded[:, 402:]
    assert clipped.mean() > 0.01  # the floor bites in the pauses: not the recorded fixed-floor values
    np.testing.assert_array_equal(ours[:, 402:][~clipped], recorded[:, 402:][~clipped])


def test_log_floor_seconds_sets_the_switch():
    x = speech(2 * SR + 500, seed=4)
    dynamic = stream(x, log_floor_seconds=0)
    np.testing.assert_array_equal(dynamic[:, :102], live_whisper(x[:FIRST_POINT])[:, :102])
    fixed = stream(speech(7 * SR, seed=5), log_floor_seconds=30)
    stable = stable_frames(7 * SR)
    np.testing.assert_array_equal(fixed[:, :stable], A.log_mel(speech(7 * SR, seed=5), -10.0)[:, :stable])


def test_past_30s_upstreams_window_slides_by_10s():
    x = speech(32 * SR + 40, seed=6)
    ours = stream(x)
    assert ours.shape == (80, A.mel_frames(x.size))
    last_before, first_after = points(x.size)[28], points(x.size)[29]  # 464 480 and 480 480 samples
    done = stable_frames(last_before)
    np.testing.assert_array_equal(ours[:, done - 100:done], live_whisper(x[:last_before])[:, done - 100:done])
    window = x[10 * SR:first_after]  # the point that reaches 30 s drops the oldest 10 s (1000 frames) first
    upto = stable_frames(first_after)
    np.testing.assert_array_equal(ours[:, done:upto], live_whisper(window)[:, done - 1000:upto - 1000])
    np.testing.assert_array_equal(ours[:, -100:-1], live_whisper(x[10 * SR:])[:, -99:])  # flush: the same window
    rng = np.random.default_rng(2)
    np.testing.assert_array_equal(stream(x, [int(p) for p in rng.integers(0, 40000, 40)]), ours)


def test_emitted_frames_never_change(clip12):
    x, whole = clip12
    mel, returned = StreamingMel(), []
    for a in range(0, 7 * SR, 3000):  # a stream cut at 7 s (past the switch), not flushed
        returned.append(mel.feed(x[a:a + 3000]))
    early = np.concatenate(returned, axis=1)
    copies = [r.copy() for r in returned]
    np.testing.assert_array_equal(early, whole[:, :early.shape[1]])  # what came later did not change them
    mel.feed(x[7 * SR + 3000 - 7 * SR % 3000:])
    mel.flush()
    for r, c in zip(returned, copies, strict=True):
        np.testing.assert_array_equal(r, c)  # and the arrays handed out are not reused


# ----- input ------------------------------------------------------------------------------------------------


def test_int16_pcm_is_scaled_as_soundfile_reads_it():
    pcm = (speech(20000, seed=7) * 32767).astype(np.int16)
    np.testing.assert_array_equal(stream(pcm), stream(pcm.astype(np.float32) / 32768))


@pytest.mark.parametrize("bad, message", [
    (np.array([0.0, np.nan], np.float32), "NaN or infinite"),
    (np.array([np.inf], np.float32), "NaN or infinite"),
    (np.zeros((2, 160), np.float32), "mono samples [n]"),
    (np.zeros(160, np.int8), "dtype int8"),
    (np.zeros(160, np.complex64), "dtype complex64"),
    ([0.0, 0.1], "numpy array"),
])
def test_bad_samples_are_one_line_user_errors(bad, message):
    with pytest.raises(UserError, match=re.escape(message)) as err:
        StreamingMel().feed(bad)
    assert "\n" not in str(err.value)


def test_bad_state_and_settings_are_user_errors():
    mel = StreamingMel()
    mel.feed(np.zeros(1000, np.float32))
    mel.flush()
    with pytest.raises(UserError, match="flushed"):
        mel.feed(np.zeros(10, np.float32))
    for bad in (-1, float("nan"), True, "5"):
        with pytest.raises(UserError, match="log_floor_seconds"):
            StreamingMel(bad)
