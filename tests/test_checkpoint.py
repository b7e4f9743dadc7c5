"""Strict loading: every failure names its culprit; round trips, sharding, skipped modules, model resolution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpm.checkpoint import load_model, resolve_model, save_model
from minicpm.errors import UserError


@pytest.fixture
def v4_copy(tiny_path, tmp_path):
    src = tiny_path("tiny-minicpm-v-4")
    dst = tmp_path / "ckpt"
    shutil.copytree(src, dst)
    return dst


def _edit_weights(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_key_is_named(v4_copy):
    _edit_weights(v4_copy, lambda s: s.pop("llm.model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(UserError, match=r"missing keys: llm\.model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(v4_copy)


def test_wrong_shape_is_named(v4_copy):
    _edit_weights(v4_copy, lambda s: s.__setitem__("resampler.query", torch.zeros(32, 256)))
    expected = r"shape mismatch: resampler\.query \(checkpoint \[32, 256\], model \[64, 256\]\)"
    with pytest.raises(UserError, match=expected):
        load_model(v4_copy)


def test_unexpected_key_is_named(v4_copy):
    _edit_weights(v4_copy, lambda s: s.__setitem__("vpm.extra.weight", torch.zeros(3)))
    with pytest.raises(UserError, match=r"unexpected keys: vpm\.extra\.weight"):
        load_model(v4_copy)


def test_unknown_version_is_named(v4_copy):
    _edit_config(v4_copy, version=3.7)
    with pytest.raises(UserError, match=r"unknown version 3\.7 for model_type 'minicpmv'"):
        load_model(v4_copy)


def test_not_a_minicpm_config(v4_copy):
    _edit_config(v4_copy, model_type="llama")
    with pytest.raises(UserError, match="model_type 'llama' is not a MiniCPM"):
        load_model(v4_copy)


def test_pickled_weights_are_refused(v4_copy):
    (v4_copy / "model.safetensors").unlink()
    (v4_copy / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="only safetensors.*pytorch_model.bin"):
        load_model(v4_copy)


def test_corrupt_safetensors_is_named(v4_copy):
    (v4_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_model(v4_copy)


def test_save_load_round_trip(tiny, tmp_path):
    ckpt, model = tiny("tiny-minicpm-v-4")
    out = save_model(model, tmp_path / "saved", ckpt.tokenizer)
    again, _ = load_model(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == ckpt.config.raw
    assert not list(out.glob("*.tmp"))


def test_sharded_checkpoint_loads_through_the_index(v4_copy):
    state = load_file(str(v4_copy / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, str(v4_copy / name))
    (v4_copy / "model.safetensors").unlink()
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (v4_copy / "model.safetensors.index.json").write_text(json.dumps(index))
    model, report = load_model(v4_copy)
    assert report.loaded == len(keys)
    assert torch.equal(model.state_dict()["resampler.query"], state["resampler.query"])
    (v4_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors"):
        load_model(v4_copy)


def test_tts_weights_are_skipped_on_purpose_and_audio_loaded(tiny_path):
    model, report = load_model(tiny_path("tiny-minicpm-o-4.5"))
    assert report.skipped == {"tts.": 3}  # apm.* and audio_projection_layer.* load strictly (init_audio)
    assert "skipped 3 tts.* tensors" in report.describe()
    assert report.loaded == len(model.state_dict())


def test_derived_buffers_in_a_checkpoint_are_skipped(v4_copy):
    def add(s):
        s["vpm.embeddings.position_ids"] = torch.arange(4900)[None]
        s["llm.model.rotary_emb.inv_freq"] = torch.ones(64)

    _edit_weights(v4_copy, add)
    _, report = load_model(v4_copy)
    assert report.skipped == {"derived buffers": 2}
    assert "skipped 2 derived buffers (recomputed here)" in report.describe()


def test_drop_vision_last_layer(v4_copy):
    _edit_config(v4_copy, drop_vision_last_layer=True)
    model, report = load_model(v4_copy)
    assert len(model.vpm.encoder.layers) == 2  # 3 in the config, the last one dropped
    assert report.skipped == {"vpm.encoder.layers.2.": 16}


def test_resolve_names(tiny_path, tmp_path, monkeypatch):
    assert resolve_model("tiny-minicpm-v-4") == tiny_path("tiny-minicpm-v-4")
    assert resolve_model(str(tmp_path)) == tmp_path
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(UserError, match="openbmb/MiniCPM-V-4 is not in the local Hugging Face cache"):
        resolve_model("MiniCPM-V-4")
    with pytest.raises(UserError, match="model not found: ./nowhere"):
        resolve_model("./nowhere")
