"""The o-models' audio encoder (apm + projection + pooling): references, token counts, loading, chunked
encoding and the eager audio path through generate()."""

from __future__ import annotations

import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from minicpm.audio_encoder import audio_token_count, block_causal_mask
from minicpm.checkpoint import load_model
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig, generate
from minicpm.prompt import Prompt

O_MODELS = ["tiny-minicpm-o-4.5", "tiny-minicpm-o-2.6"]
SR = 16000


def speechlike(seconds: float, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-like signal: a gliding harmonic tone under a syllable envelope, plus noise; the seed
    picks the pitch, the syllable rate and the noise."""
    rng = np.random.RandomState(seed)
    base, rate = rng.uniform(90, 260), rng.uniform(2, 6)
    t = np.arange(round(seconds * SR)) / SR
    f0 = base * (1 + 0.25 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / SR
    voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.sin(np.pi * rate * t) ** 2
    return (0.3 * voice + 0.01 * rng.randn(t.size)).astype(np.float32)


def mel(audio: np.ndarray) -> torch.Tensor:
    """[1, 80, frames] as upstream's processor: 30 s pieces through WhisperFeatureExtractor, valid frames kept."""
    fe = WhisperFeatureExtractor(feature_size=80)
    pieces = []
    for start in range(0, audio.size, 30 * SR):
        out = fe(audio[start:start + 30 * SR], sampling_rate=SR, return_attention_mask=True, padding="max_length",
                 return_tensors="np")
        pieces.append(out["input_features"][0][:, : int(out["attention_mask"][0].sum())])
    return torch.from_numpy(np.concatenate(pieces, axis=1))[None]


def written_out_encoder(model, features: torch.Tensor) -> torch.Tensor:
    """Upstream's encoder math spelled out with plain tensor ops: convolutions, positions, pre-LN layers whose
    queries in chunk k attend exactly keys [0, (k + 1) * chunk), final LayerNorm, projection, mean of windows."""
    apm, proj, pool = model.apm, model.audio_projection_layer, model.config.audio_pool_step
    chunk = model.config.audio_chunk_frames
    f = torch.nn.functional
    x = f.gelu(f.conv1d(features, apm.conv1.weight, apm.conv1.bias, padding=1))
    x = f.gelu(f.conv1d(x, apm.conv2.weight, apm.conv2.bias, stride=2, padding=1))[0].T
    x = x + apm.embed_positions.weight[: x.shape[0]]
    heads = apm.config.encoder_attention_heads
    d = x.shape[1] // heads
    for layer in apm.layers:
        a = layer.self_attn
        h = f.layer_norm(x, (x.shape[1],), layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias)
        q = (h @ a.q_proj.weight.T + a.q_proj.bias).view(-1, heads, d).transpose(0, 1)
        k = (h @ a.k_proj.weight.T).view(-1, heads, d).transpose(0, 1)
        v = (h @ a.v_proj.weight.T + a.v_proj.bias).view(-1, heads, d).transpose(0, 1)
        rows = []
        for s in range(0, x.shape[0], chunk):
            e = min(s + chunk, x.shape[0])
            w = torch.softmax(q[:, s:e] @ k[:, :e].transpose(1, 2) / math.sqrt(d), -1)
            rows.append(w @ v[:, :e])
        att = torch.cat(rows, dim=1).transpose(0, 1).reshape(x.shape[0], -1)
        x = x + att @ a.out_proj.weight.T + a.out_proj.bias
        h = f.layer_norm(x, (x.shape[1],), layer.final_layer_norm.weight, layer.final_layer_norm.bias)
        x = x + f.gelu(h @ layer.fc1.weight.T + layer.fc1.bias) @ layer.fc2.weight.T + layer.fc2.bias
    x = f.layer_norm(x, (x.shape[1],), apm.layer_norm.weight, apm.layer_norm.bias)
    y = torch.relu(x @ proj.linear1.weight.T + proj.linear1.bias) @ proj.linear2.weight.T + proj.linear2.bias
    t = (y.shape[0] - pool) // pool + 1
    return y[: t * pool].view(t, pool, -1).mean(1)


@pytest.mark.parametrize("name", O_MODELS)
def test_full_attention_equals_stock_whisper_encoder(tiny, name):
    """Stock WhisperEncoder.forward (3000 frames, no mask) on the same weights: our variable-length forward with
    the chunk mask off must agree; the clip is a full 30 s, so no padding is involved."""
    _, model = tiny(name)
    stock = WhisperEncoder(model.apm.config).eval()
    stock.load_state_dict(model.apm.state_dict())
    features = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = stock(features).last_hidden_state
        got = model.apm.forward_clip(features, chunk=0)
        masked = model.apm.forward_clip(features, chunk=model.config.audio_chunk_frames)
    assert got.shape == (1, 1500, model.config.audio.d_model)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(masked, expected, atol=1e-3)  # the chunk mask really changes the states


@pytest.mark.parametrize("name", O_MODELS)
@pytest.mark.parametrize("frames", [37, 100, 257, 613])
def test_encode_audio_equals_written_out_upstream_math(tiny, name, frames):
    _, model = tiny(name)
    features = torch.randn(1, 80, frames, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        expected = written_out_encoder(model, features)
    got = model.encode_audio(features)
    assert got.shape == (audio_token_count(frames, model.config.audio_pool_step), model.config.hidden_size)
    assert torch.allclose(got, expected, atol=1e-5)


def test_block_causal_mask():
    m = block_causal_mask(7, 3)
    assert m[0].tolist() == [True, True, True, False, False, False, False]
    assert m[4].tolist() == [True] * 6 + [False]
    assert m[6].all()


@pytest.mark.parametrize("name,pool", [("tiny-minicpm-o-4.5", 5), ("tiny-minicpm-o-2.6", 2)])
def test_token_counts_from_0_1_to_60_seconds(tiny, name, pool):
    _, model = tiny(name)
    assert model.config.audio_pool_step == pool  # read from config.json
    expected_45 = {0.1: 1, 0.78125: 8, 1.0: 10, 2.5: 25, 30.0: 300, 31.3: 313, 45.0: 450, 60.0: 600}
    for seconds in [0.1, 0.5, 0.78125, 1.0, 2.5, 7.3, 29.99, 30.0, 31.3, 45.0, 60.0]:
        audio = speechlike(seconds)
        features = mel(audio)
        f = features.shape[-1]
        assert f == math.ceil(audio.size / 160)
        c = (f - 1) // 2 + 1
        t = (c - pool) // pool + 1
        assert model.encode_audio(features).shape == (t, model.config.hidden_size), seconds
        if pool == 5 and seconds in expected_45:
            assert t == expected_45[seconds]  # 12 500 samples: 79 frames, 40 encoder frames, 8 tokens


@pytest.mark.parametrize("name", O_MODELS)
def test_strict_loading_loads_audio_and_skips_tts(tiny_path, name):
    path = tiny_path(name)
    model, report = load_model(path)
    assert report.skipped == {"tts.": 3}
    assert "skipped 3 tts.* tensors (not built here)" in report.describe()
    state = load_file(str(path / "model.safetensors"))
    audio = sorted(k for k in state if k.startswith(("apm.", "audio_projection_layer.")))
    # convs and positions, 2 layers of 15 (k_proj has no bias, as stock Whisper), final norm, projection
    assert len(audio) == 5 + 2 * 15 + 2 + 4
    params = model.state_dict()
    assert all(torch.equal(params[k], state[k]) for k in audio)
    assert report.loaded == len(params)


def test_missing_or_misshapen_audio_weights_are_named(tiny_path, tmp_path):
    src = tiny_path("tiny-minicpm-o-4.5")
    dst = tmp_path / "o45"
    shutil.copytree(src, dst)
    state = load_file(str(dst / "model.safetensors"))
    state.pop("apm.layers.1.fc2.bias")
    save_file(state, str(dst / "model.safetensors"))
    with pytest.raises(UserError, match=r"missing keys: apm\.layers\.1\.fc2\.bias"):
        load_model(dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["audio_config"]["encoder_ffn_dim"] = 64
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"encoder_ffn_dim // 4 \(16\) must equal d_model \(32\)"):
        load_model(dst)
    cfg["init_audio"] = False  # upstream builds no apm then: its weights are skipped, and said so
    (dst / "config.json").write_text(json.dumps(cfg))
    model, report = load_model(dst)
    assert not hasattr(model, "apm")
    assert report.skipped == {"apm.": 36, "audio_projection_layer.": 4, "tts.": 3}


@pytest.mark.parametrize("name", O_MODELS)
@pytest.mark.parametrize("seconds", [0.63, 1.0, 4.37])
def test_chunked_encoding_equals_whole_clip(tiny, name, seconds):
    _, model = tiny(name)
    features = mel(speechlike(seconds, seed=3))
    whole = model.encode_audio(features)
    for step in (100, 37):  # 1 s chunks as they are finished, and uneven arrivals
        cache, outs = None, []
        for s in range(0, features.shape[-1], step):
            out, cache = model.encode_audio_chunked(features[:, :, s:s + step], cache, final=False)
            outs.append(out)
        out, cache = model.encode_audio_chunked(features[:, :, :0], cache, final=True)
        chunked = torch.cat([*outs, out])
        assert chunked.shape == whole.shape
        assert torch.allclose(chunked, whole, atol=1e-5)
    one_call, _ = model.encode_audio_chunked(features)  # a recorded clip in one call (final by default)
    assert torch.allclose(one_call, whole, atol=1e-5)


def test_chunked_encoding_waits_for_the_look_ahead_frame(tiny):
    _, model = tiny("tiny-minicpm-o-4.5")
    features = mel(speechlike(2.0, seed=5))
    out, cache = model.encode_audio_chunked(features[:, :, :100], final=False)
    assert out.shape[0] == 0  # frame 100 is still missing: the last encoder frame of chunk 0 reads it
    out, cache = model.encode_audio_chunked(features[:, :, 100:101], cache, final=False)
    assert torch.allclose(out, model.encode_audio(features)[:10], atol=1e-5)


def test_chunked_encoding_across_the_30_s_piece_boundary(tiny):
    _, model = tiny("tiny-minicpm-o-4.5")
    features = torch.randn(1, 80, 3157, generator=torch.Generator().manual_seed(7))
    cache, outs = None, []
    for s in range(0, 3157, 100):
        out, cache = model.encode_audio_chunked(features[:, :, s:s + 100], cache, final=False)
        outs.append(out)
    outs.append(model.encode_audio_chunked(features[:, :, :0], cache)[0])
    assert torch.allclose(torch.cat(outs), model.encode_audio(features), atol=1e-5)


def _audio_prompt(ckpt, n: int, audio=None) -> Prompt:
    tok = ckpt.tokenizer
    text = ("<|im_start|>user\n<|audio_start|>" + "<unk>" * n + "<|audio_end|>What did you hear?<|im_end|>\n"
            "<|im_start|>assistant\n")
    ids = tok.encode(text, add_special_tokens=False)
    start = ids.index(tok.convert_tokens_to_ids("<|audio_start|>")) + 1
    end = ids.index(tok.convert_tokens_to_ids("<|audio_end|>"))
    assert end - start == n and all(i == tok.convert_tokens_to_ids("<unk>") for i in ids[start:end])
    prompt = Prompt(ids, [], [], text)
    prompt.audio_bounds = [(start, end)]
    prompt.audios = [] if audio is None else [SimpleNamespace(features=audio)]
    return prompt


@pytest.mark.parametrize("name", O_MODELS)
def test_generate_uses_the_audio(tiny, name):
    ckpt, model = tiny(name)
    cfg = SamplingConfig(max_new_tokens=8)
    noise = (0.3 * np.random.RandomState(0).randn(24000)).astype(np.float32)
    clips = [mel(speechlike(1.5, seed=1))[0].numpy(), mel(noise)[0].numpy()]
    runs = []
    for features in (clips[0], clips[1], clips[0]):
        n = model.encode_audio(torch.from_numpy(features)[None]).shape[0]
        assert n == {5: 15, 2: 37}[model.config.audio_pool_step]
        runs.append(generate(model, _audio_prompt(ckpt, n, features), ckpt.tokenizer, cfg, stop_ids=[]))
    assert runs[0].token_ids == runs[2].token_ids and len(runs[0].token_ids) == 8
    assert runs[0].token_ids != runs[1].token_ids  # other audio, other answer: the features reach the LLM
    assert runs[0].stats["audios"] == 1 and runs[0].stats["audio_ms"] > 0
    with pytest.raises(ValueError, match="audio placeholder spans hold 3 tokens, the audio gives (15|37)"):
        generate(model, _audio_prompt(ckpt, 3, clips[0]), ckpt.tokenizer, cfg, stop_ids=[])


def test_text_only_prompts_have_no_audio_fields(tiny):
    """Prompts built before the audio fields exist still generate (getattr defaults)."""
    ckpt, model = tiny("tiny-minicpm-o-4.5")
    prompt = Prompt(ckpt.tokenizer.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"), [])
    out = generate(model, prompt, ckpt.tokenizer, SamplingConfig(max_new_tokens=3), stop_ids=[])
    assert len(out.token_ids) == 3 and "audio_ms" not in out.stats
