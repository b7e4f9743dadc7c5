"""Audio input for the o-models: loading, resampling, downmix, log-mel features against transformers' Whisper
extractor, token and placeholder arithmetic, prompts (real o-4.5 tokenizer, tiny o-2.6), bad input, the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
from PIL import Image
from transformers import WhisperFeatureExtractor
from transformers.audio_utils import spectrogram, window_function

from minicpm import audio as A
from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.prompt import PromptBuilder, SpecialTokens, load_tokenizer
from tests.conftest import REFERENCE_O45

SR = 16000
IM_START, IM_END, NL, NL2 = 151644, 151645, 198, 271
USER, ASSISTANT = 872, 77091
IMG, IMG_END, ID, ID_END, UNK = 151669, 151670, 151681, 151682, 128244
AUDIO_START, AUDIO_END, TTS_BOS, THINK, THINK_END = 151697, 151699, 151703, 151667, 151668
WHAT = [3838, 374, 419, 30]  # "What is this?"
GEN = [IM_START, ASSISTANT, NL, THINK, NL2, THINK_END, NL2]  # thinking off
SMALL = Image.new("RGB", (200, 150))  # one image, not sliced


def speechlike(seconds: float, rate: int = SR, seed: int = 0) -> np.ndarray:
    """A voiced-like signal: gliding harmonics under a syllable envelope, with a near-silent pause and some noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * rate)) / rate
    f0 = rng.uniform(100, 220) * (1 + 0.2 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    envelope = np.sin(np.pi * 3.0 * t) ** 2 * (np.sin(2 * np.pi * 0.25 * t) > -0.7)
    voice = sum(np.sin(k * phase) / k for k in range(1, 7)) * envelope
    return (0.3 * voice + 1e-4 * rng.standard_normal(t.size)).astype(np.float32)


def whisper(samples: np.ndarray) -> np.ndarray:
    """transformers' WhisperFeatureExtractor as upstream's processor calls it: padded to 30 s, valid frames kept."""
    out = WhisperFeatureExtractor()(samples, sampling_rate=SR, padding="max_length", return_attention_mask=True,
                                    return_tensors="np")
    return out["input_features"][0][:, : int(out["attention_mask"][0].sum())]


# ----- features ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seconds", [0.1, 1.0, 1.01, 2.5, 30.0])
def test_dynamic_floor_features_equal_whisper_feature_extractor(seconds):
    x = speechlike(seconds)
    features = A.log_mel(x)
    assert features.dtype == np.float32 and features.shape == (80, math.ceil(x.size / 160))
    np.testing.assert_array_equal(features, whisper(x))  # max - 8 is Whisper's own rule: bit for bit


def test_fixed_streaming_floor():
    x = speechlike(2.5)
    x[8000:12000] = 0  # digital silence: log10 clamps at 1e-10, the fixed floor's -10
    fixed, dynamic = A.log_mel(x, A.STREAMING_LOG_FLOOR), A.log_mel(x)
    # the same log-mel under another floor: equal wherever neither floor clips, -1.5 where -10 clips
    raw = 4 * dynamic - 4
    free = raw > max(raw.max() - 8, -10) + 1e-3
    assert free.mean() > 0.3 and (~free).any()
    np.testing.assert_array_equal(fixed[free], dynamic[free])
    # ... and upstream's numpy rule written out: log10 mel, last frame dropped, max(x, -10), (x + 4) / 4
    fe = WhisperFeatureExtractor()
    padded = np.pad(x, (0, 30 * SR - x.size))
    log_spec = spectrogram(padded, window_function(400, "hann"), frame_length=400, hop_length=160, power=2.0,
                           mel_filters=fe.mel_filters, log_mel="log10")[:, :-1]
    log_spec = log_spec[:, : fixed.shape[1]]
    between = (log_spec > -10 + 0.1) & (log_spec < log_spec.max() - 8 - 0.1)  # where the two floors differ
    assert between.mean() > 0.01
    expected = (np.maximum(log_spec, -10.0) + 4.0) / 4.0
    np.testing.assert_allclose(fixed, expected, atol=1e-3)  # float64 numpy vs float32 torch STFT
    assert fixed.min() == np.float32(-1.5) < dynamic.min()


def test_long_audio_is_cut_every_30_s_with_its_own_features():
    x = speechlike(45.0)
    a = A.process_audio(x, pool=5)
    assert (a.samples, a.seconds, a.chunks, a.features.shape) == (720000, 45.0, 2, (80, 4500))
    first, second = a.chunk_features()
    np.testing.assert_array_equal(first, whisper(x[: 30 * SR]))
    np.testing.assert_array_equal(second, whisper(x[30 * SR:]))  # own padding, own max
    assert a.tokens == 450 == 300 + A.audio_tokens(15 * SR, 5)


# ----- loading ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [8000, 44100])
def test_other_rates_are_resampled(tmp_path, rate):
    t = np.arange(int(1.5 * rate)) / rate
    path = tmp_path / f"tone{rate}.wav"
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, subtype="FLOAT")
    y = A.load_waveform(path)
    assert y.dtype == np.float32 and y.size == math.ceil(t.size * SR / rate) == 24000
    expected = 0.5 * np.sin(2 * np.pi * 440 * np.arange(y.size) / SR)
    inner = slice(800, -800)  # away from the filter's edges
    assert np.abs(y[inner] - expected[inner]).max() < 2e-3
    assert A.process_audio(path, pool=5).tokens == 15


def test_stereo_is_the_channel_mean(tmp_path):
    left, right = speechlike(1.0, seed=1), speechlike(1.0, seed=2)
    sf.write(tmp_path / "st.wav", np.stack([left, right], axis=1), SR, subtype="FLOAT")
    np.testing.assert_array_equal(A.load_waveform(tmp_path / "st.wav"), (left + right) / np.float32(2))
    np.testing.assert_array_equal(A.load_waveform(np.stack([left, right])), (left + right) / np.float32(2))
    at_44k = np.stack([speechlike(1.0, 44100, 1), speechlike(1.0, 44100, 2)], axis=1)
    np.testing.assert_array_equal(A.load_waveform(at_44k, 44100), A.load_waveform(at_44k.mean(axis=1), 44100))


def test_flac_and_ogg_files(tmp_path):
    x = speechlike(1.0)
    sf.write(tmp_path / "a.flac", x, SR)
    sf.write(tmp_path / "a.ogg", x, SR)
    np.testing.assert_array_equal(A.load_waveform(tmp_path / "a.flac"), sf.read(tmp_path / "a.flac",
                                                                                  dtype="float32")[0])
    ogg = A.load_waveform(tmp_path / "a.ogg")
    assert ogg.size == SR and np.corrcoef(ogg, x)[0, 1] > 0.95  # lossy, but the same signal


# ----- token arithmetic ---------------------------------------------------------------------------------------

# seconds -> (mel frames, chunks, tokens at pool 5, tokens at pool 2)
LENGTHS = {0.1: (10, 1, 1, 2), 0.5: (50, 1, 5, 12), 1.0: (100, 1, 10, 25), 1.01: (101, 1, 10, 25),
           1.5: (150, 1, 15, 37), 2.5: (250, 1, 25, 62), 10.0: (1000, 1, 100, 250), 30.0: (3000, 1, 300, 750),
           60.0: (6000, 2, 600, 1500)}


@pytest.mark.parametrize("seconds", list(LENGTHS))
def test_token_and_placeholder_counts(seconds):
    frames, chunks, t5, t2 = LENGTHS[seconds]
    n = round(seconds * SR)
    assert A.mel_frames(n) == frames and (A.audio_tokens(n, 5), A.audio_tokens(n, 2)) == (t5, t2)
    assert A.placeholder_lengths(t5, 5, False) == [t5] and A.placeholder_lengths(t2, 2, False) == [t2]
    for tokens, pool, per in ((t5, 5, 10), (t2, 2, 25)):  # streaming: one span per 1 s chunk, the last shorter
        spans = A.placeholder_lengths(tokens, pool, True)
        assert spans == [per] * (tokens // per) + ([tokens % per] if tokens % per else [])
    a = A.process_audio(np.zeros(n, np.float32), pool=5)
    assert a.summary() == {"seconds": n / SR, "mel_frames": frames, "chunks": chunks, "tokens": t5}


def test_streaming_spans_of_a_last_short_chunk():
    assert A.placeholder_lengths(25, 5, True) == [10, 10, 5]
    assert A.placeholder_lengths(62, 2, True) == [25, 25, 12]
    assert (A.chunk_tokens(5), A.chunk_tokens(2)) == (10, 25)


@pytest.mark.parametrize("name, pool, stream_default", [("tiny-minicpm-o-4.5", 5, False),
                                                         ("tiny-minicpm-o-2.6", 2, True)])
def test_prompt_spans_for_every_length(name, pool, stream_default):
    from minicpm.checkpoint import Checkpoint

    builder = Checkpoint.open(name).prompts
    unk = builder.tokenizer.convert_tokens_to_ids("<unk>")
    for seconds in (0.1, 1.01, 2.5, 60.0):
        tokens = LENGTHS[seconds][2 if pool == 5 else 3]
        clip = np.zeros(round(seconds * SR), np.float32)
        for stream in (False, True):
            p = builder.build([{"role": "user", "content": [{"type": "audio", "audio": clip}, "hi"]}],
                              stream_input=stream)
            assert [e - s for s, e in p.audio_bounds] == A.placeholder_lengths(tokens, pool, stream)
            assert all(p.input_ids[i] == unk for s, e in p.audio_bounds for i in range(s, e))
            assert p.image_bounds == [] and p.audios[0].tokens == tokens
        default = builder.build([{"role": "user", "content": [{"type": "audio", "audio": clip}]}])
        assert len(default.audio_bounds) == len(A.placeholder_lengths(tokens, pool, stream_default))


# ----- prompts: the real o-4.5 tokenizer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def o45():
    from minicpm.tiny import _tiny_configs

    config = MiniCPMConfig.from_dict({**_tiny_configs()["tiny-minicpm-o-4.5"]})
    return PromptBuilder(load_tokenizer(REFERENCE_O45), config, SpecialTokens.from_dir(REFERENCE_O45))


def audio_span(n: int) -> list[int]:
    return [AUDIO_START, *[UNK] * n, AUDIO_END]


def test_o45_audio_message(o45):
    clip = speechlike(2.5)
    p = o45.build([{"role": "user", "content": [{"type": "audio", "audio": clip}, "What is this?"]}])
    # one span per clip; a message with audio ends the prompt with the TTS template's <|tts_bos|>
    assert p.input_ids == [IM_START, USER, NL, *audio_span(25), NL, *WHAT, IM_END, NL, *GEN, TTS_BOS]
    assert p.audio_bounds == [(4, 29)] and p.image_bounds == []
    assert "<|im_start|>user\n<|audio_start|><unk>" in p.text and p.text.endswith("</think>\n\n<|tts_bos|>")
    np.testing.assert_array_equal(p.audios[0].features, whisper(clip))
    thinking = o45.build([{"role": "user", "content": [{"type": "audio", "audio": clip}]}], enable_thinking=True)
    assert thinking.input_ids[-4:] == [IM_START, ASSISTANT, NL, TTS_BOS]


def test_o45_streaming_input_joins_items_without_newlines(o45):
    p = o45.build([{"role": "user", "content": [{"type": "audio", "audio": speechlike(2.5)}, "What is this?"]}],
                  stream_input=True)
    assert p.input_ids == [IM_START, USER, NL, *audio_span(10), *audio_span(10), *audio_span(5), *WHAT, IM_END, NL,
                           *GEN, TTS_BOS]
    assert p.audio_bounds == [(4, 14), (16, 26), (28, 33)]


def test_o45_image_audio_text_message(o45):
    p = o45.build([{"role": "user", "content": [SMALL, {"type": "audio", "audio": speechlike(1.0)},
                                                "What is this?"]}])
    image = [ID, 15, ID_END, IMG, *[UNK] * 64, IMG_END]
    assert p.input_ids == [IM_START, USER, NL, *image, NL, *audio_span(10), NL, *WHAT, IM_END, NL, *GEN, TTS_BOS]
    assert p.image_bounds == [(7, 71)] and p.audio_bounds == [(74, 84)]  # audio spans are not image spans
    assert len(p.images) == 1 and len(p.audios) == 1


def test_o45_follow_up_turn_with_audio(o45):
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": speechlike(0.5)}, "What is this?"]}]
    p = o45.build_turn(msgs, first_image=1)
    assert p.input_ids == [IM_END, NL, IM_START, USER, NL, *audio_span(5), NL, *WHAT, IM_END, NL, *GEN, TTS_BOS]
    assert p.audio_bounds == [(6, 11)]
    text_only = [{"role": "user", "content": "What is this?"}]
    assert o45.build_turn(text_only, 1).input_ids[-1] == NL2  # no audio in these messages: plain template
    assert o45.build_turn(text_only, 1, tts_template=True).input_ids[-1] == TTS_BOS  # audio earlier on


def test_two_audios_in_one_message_get_their_own_features_and_spans(o45):
    a, b = speechlike(1.0, seed=3), speechlike(2.5, seed=4)
    p = o45.build([{"role": "user", "content": [{"type": "audio", "audio": a}, {"type": "audio", "audio": b}, "?"]}])
    assert [e - s for s, e in p.audio_bounds] == [10, 25] and p.audio_bounds[1][0] == p.audio_bounds[0][1] + 3
    np.testing.assert_array_equal(p.audios[1].features, whisper(b))


def test_prepared_audio_inputs_are_reused_and_checked(o45):
    prepared = A.process_audio(speechlike(2.5), pool=5)
    p = o45.build([{"role": "user", "content": [prepared, "What is this?"]}])
    assert p.audios[0] is prepared and p.audio_bounds == [(4, 29)]
    with pytest.raises(UserError, match="another audio_pool_step"):
        o45.build([{"role": "user", "content": [A.process_audio(speechlike(2.5), pool=2)]}])


# ----- prompts: tiny o-2.6 ----------------------------------------------------------------------------------------


def test_o26_audio_uses_its_tts_template_and_chunked_spans():
    from minicpm.checkpoint import Checkpoint

    builder = Checkpoint.open("tiny-minicpm-o-2.6").prompts
    tok = builder.tokenizer
    clip = {"type": "audio", "audio": speechlike(2.5)}
    spans = "".join("<|audio_start|>" + "<unk>" * n + "<|audio_end|>" for n in (25, 25, 12))
    gen = "<|im_start|>assistant\n<|spk_bos|><|spk|><|spk_eos|><|tts_bos|>"
    p = builder.build([{"role": "user", "content": [clip, "What is this?"]}])
    # chat(chunk_input=True) by default; the TTS template has no default system message
    assert p.text == f"<|im_start|>user\n{spans}\nWhat is this?<|im_end|>\n{gen}"
    assert p.input_ids == tok.encode(p.text)
    start = tok.encode("<|im_start|>user\n<|audio_start|>")
    assert p.audio_bounds[0][0] == len(start) and [e - s for s, e in p.audio_bounds] == [25, 25, 12]
    recorded = builder.build([{"role": "user", "content": [clip]}], stream_input=False)
    assert [e - s for s, e in recorded.audio_bounds] == [62]

    mixed = builder.build([{"role": "user", "content": [SMALL, clip, "What is this?"]}])
    image = builder.image_placeholder(mixed.images[0], 0)
    assert mixed.text == f"<|im_start|>user\n{image}\n{spans}\nWhat is this?<|im_end|>\n{gen}"
    assert len(mixed.image_bounds) == 1 and [e - s for s, e in mixed.audio_bounds] == [25, 25, 12]
    assert mixed.image_bounds[0][1] < mixed.audio_bounds[0][0]

    turn = builder.build_turn([{"role": "user", "content": [clip, "More?"]}], first_image=1)
    assert turn.text == f"<|im_end|>\n<|im_start|>user\n{spans}\nMore?<|im_end|>\n{gen}"
    assert turn.input_ids == tok.encode(turn.text) and len(turn.audio_bounds) == 3
    plain = builder.build([{"role": "user", "content": "What is this?"}])
    assert plain.text.startswith("<|im_start|>system\nYou are a helpful assistant.") and plain.audio_bounds == []


# ----- bad input ----------------------------------------------------------------------------------------------------


def one_line_error(fn, match: str) -> None:
    with pytest.raises(UserError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)


def test_bad_files(tmp_path):
    one_line_error(lambda: A.load_waveform(tmp_path / "gone.wav"), "no such audio file")
    (tmp_path / "junk.wav").write_bytes(b"not audio at all" * 10)
    one_line_error(lambda: A.load_waveform(tmp_path / "junk.wav"), "cannot read the audio")
    for ext in ("wav", "flac"):
        sf.write(tmp_path / f"full.{ext}", speechlike(1.0), SR)
        data = (tmp_path / f"full.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) // 2])
        one_line_error(lambda e=ext: A.load_waveform(tmp_path / f"cut.{e}"), "truncated|cannot read")
    sf.write(tmp_path / "empty.wav", np.zeros(0, np.float32), SR)
    one_line_error(lambda: A.load_waveform(tmp_path / "empty.wav"), "zero length")
    sf.write(tmp_path / "long.wav", np.zeros(601 * 1000, np.int16), 1000)  # 601 s, small at 1 kHz
    one_line_error(lambda: A.load_waveform(tmp_path / "long.wav"), "over the 600 s limit")


def test_bad_arrays():
    one_line_error(lambda: A.load_waveform(np.zeros(0, np.float32)), "zero length")
    for bad in (np.nan, np.inf, -np.inf):
        x = speechlike(0.5)
        x[100] = bad
        one_line_error(lambda x=x: A.load_waveform(x), "NaN or infinite")
    one_line_error(lambda: A.load_waveform(np.zeros(int(600 * SR) + 1, np.float32)), "over the 600 s limit")
    assert A.load_waveform(np.zeros(600 * SR, np.float32)).size == 600 * SR  # the limit itself is accepted
    one_line_error(lambda: A.load_waveform(np.zeros(100, np.complex64)), "dtype")
    one_line_error(lambda: A.load_waveform(np.zeros((2, 2, 100), np.float32)), "shape")
    one_line_error(lambda: A.load_waveform(np.zeros(100, np.float32), 12), "sample rate")
    one_line_error(lambda: A.process_audio(np.zeros(1280, np.float32), pool=5), "too short.*0.080 s needed")
    assert A.process_audio(np.zeros(1281, np.float32), pool=5).tokens == 1


def test_bad_audio_messages(o45):
    from minicpm.checkpoint import Checkpoint

    one_line_error(lambda: o45.build([{"role": "user", "content": [{"type": "audio", "text": "x"}]}]), "needs its")
    one_line_error(lambda: o45.build([{"role": "user", "content": "say <audio>./</audio>"}]), "reserved audio tag")
    one_line_error(lambda: o45.build([{"role": "user", "content": "say <|audio_start|>x<|audio_end|>"}]),
                   "reserved audio tokens")
    one_line_error(lambda: o45.build([{"role": "user", "content": [{"type": "audio", "audio": "/no/such.wav"}]}]),
                   "no such audio file")
    v4 = Checkpoint.open("tiny-minicpm-v-4").prompts
    one_line_error(lambda: v4.build([{"role": "user", "content": [{"type": "audio", "audio": speechlike(1)}]}]),
                   "takes no audio")


# ----- command line -------------------------------------------------------------------------------------------------


def test_preprocess_json(tmp_path, capsys):
    from runtime import preprocess

    sf.write(tmp_path / "a.wav", speechlike(2.5, 44100), 44100)
    sf.write(tmp_path / "b.flac", speechlike(1.0, 8000), 8000)
    image = tmp_path / "i.png"
    SMALL.save(image)
    args = ["--model", "tiny-minicpm-o-4.5", "--image", str(image), "--audio", str(tmp_path / "a.wav"), "--audio",
            str(tmp_path / "b.flac"), "--prompt", "What is this?", "--json"]
    assert preprocess.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["audios"] == [{"seconds": 2.5, "mel_frames": 250, "chunks": 1, "tokens": 25},
                             {"seconds": 1.0, "mel_frames": 100, "chunks": 1, "tokens": 10}]
    # images first, then the audio clips in order, then the text
    assert out["image_bounds"] == [[7, 71]] and out["audio_bounds"] == [[74, 99], [102, 112]]
    ids = out["input_ids"]
    assert ids[73] == AUDIO_START and ids[99] == AUDIO_END and ids[-1] == TTS_BOS
    assert preprocess.main(args[:-1]) == 0
    assert "audio 0: 2.5 s, 250 mel frames in 1 x 30 s, 25 tokens" in capsys.readouterr().out


def test_exports_refuse_audio():
    from runtime.cli import require_audio_step

    one_line_error(lambda: require_audio_step({"model": {"variant": "minicpm-o-4.5"},
                                               "schedule": {"steps": {"vision": {}}}}), "no audio step")
