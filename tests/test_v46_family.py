"""MiniCPM-V 4.6 / 4.7 through transformers' own classes: strict loading, tiny checkpoints in the real layout, the
models' own processors, and greedy parity of our device schedule with transformers' `generate`."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from minicpm.cache import StateCache
from minicpm.errors import UserError
from minicpm.hybrid_step import HybridLanguageModelStep, greedy_generate
from minicpm.v4_6 import (
    HYBRID_VARIANTS,
    load_model,
    prompt_embeddings,
    prompt_inputs,
    prompt_positions,
)

NAMES = ["tiny-minicpm-v-4.6", "tiny-minicpm-v-4.7"]


def _image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _prompts(processor) -> dict:
    image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    video = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}]
    text = [{"role": "user", "content": [{"type": "text", "text": "Hello! How can I help you today?"}]}]
    return {
        "image": prompt_inputs(processor, image, images=[_image(300, 500)]),
        "video": prompt_inputs(processor, video, videos=[[_image(200, 300, seed=i) for i in range(3)]]),
        "text": prompt_inputs(processor, text),
    }


@pytest.mark.parametrize("name", NAMES)
def test_strict_load_equals_from_pretrained(hybrid, name):
    ckpt, ours = hybrid(name)
    assert type(ours).__name__ == ckpt.variant.model_class.__name__  # transformers' own class, no remote code
    reference = ckpt.variant.model_class.from_pretrained(str(ckpt.path), dtype=torch.float32).eval()
    for kind, inputs in _prompts(ckpt.processor).items():
        with torch.no_grad():
            a = ours(**inputs).logits
            b = reference(**inputs).logits
        assert (a - b).abs().max().item() <= 1e-5, kind


def test_tiny_layout_is_the_real_one(hybrid):
    ckpt, model = hybrid("tiny-minicpm-v-4.7")
    raw = json.loads((ckpt.path / "config.json").read_text())
    assert raw["model_type"] == "minicpmv4_7" and raw["text_config"]["model_type"] == "qwen3_5_text"
    assert set(raw["text_config"]["layer_types"]) == {"linear_attention", "full_attention"}
    assert raw["vision_config"]["insert_layer_id"] == raw["insert_layer_id"] < raw["vision_config"]["num_hidden_layers"]
    keys = set(load_file(str(ckpt.path / "model.safetensors")))
    assert "model.vision_tower.vit_merger.linear_1.weight" in keys and "model.merger.mlp.0.linear_2.weight" in keys
    assert "model.language_model.layers.0.linear_attn.A_log" in keys and "lm_head.weight" in keys
    assert "model.language_model.layers.1.self_attn.q_norm.weight" in keys
    tok = ckpt.tokenizer
    for field in ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id"):
        assert raw[field] is not None
    assert raw["image_token_id"] == tok.convert_tokens_to_ids(tok.image_token)
    assert raw["newline_id"] == tok.encode("\n", add_special_tokens=False)[0]


@pytest.fixture
def copy_46(tmp_path):
    from minicpm.tiny import ensure_tiny

    dst = tmp_path / "ckpt"
    shutil.copytree(ensure_tiny("tiny-minicpm-v-4.6"), dst)
    return dst


def _edit_weights(path, fn):
    state = load_file(str(path / "model.safetensors"))
    fn(state)
    save_file(state, str(path / "model.safetensors"))


def test_missing_tensor_is_one_line(copy_46):
    _edit_weights(copy_46, lambda s: s.pop("model.language_model.layers.0.linear_attn.dt_bias"))
    with pytest.raises(UserError, match=r"missing keys: model\.language_model\.layers\.0\.linear_attn\.dt_bias$") as e:
        load_model(copy_46)
    assert "\n" not in str(e.value)


def test_extra_tensor_is_one_line(copy_46):
    _edit_weights(copy_46, lambda s: s.__setitem__("model.merger.extra.weight", torch.zeros(3)))
    with pytest.raises(UserError, match=r"unexpected keys: model\.merger\.extra\.weight$") as e:
        load_model(copy_46)
    assert "\n" not in str(e.value)


def test_bad_configs_are_one_line(copy_46):
    from minicpm.config import MiniCPMConfig

    cfg = json.loads((copy_46 / "config.json").read_text())
    (copy_46 / "config.json").write_text(json.dumps({**cfg, "version": 4.9}))
    with pytest.raises(UserError, match=r"unknown version 4\.9 for model_type 'minicpmv4_6'"):
        load_model(copy_46)
    (copy_46 / "config.json").write_text(json.dumps({**cfg, "model_type": "minicpmv4_8"}))
    with pytest.raises(UserError, match=r"model_type 'minicpmv4_8' is not a hybrid MiniCPM-V model"):
        load_model(copy_46)
    (copy_46 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"load it with minicpm\.v4_6"):
        MiniCPMConfig.from_dir(copy_46)  # the older family's loader names the right one


def test_short_names_are_registered(monkeypatch):
    from minicpm.checkpoint import SHORT_NAMES, resolve_model

    assert {v.hub_id for v in HYBRID_VARIANTS} == {"openbmb/MiniCPM-V-4.6", "openbmb/MiniCPM-V-4.7-1B"}
    assert SHORT_NAMES["MiniCPM-V-4_6"] == "openbmb/MiniCPM-V-4.6"
    assert SHORT_NAMES["MiniCPM-V-4_7"] == "openbmb/MiniCPM-V-4.7-1B"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match=r"openbmb/MiniCPM-V-4\.7-1B is not in the local Hugging Face cache"):
        resolve_model("MiniCPM-V-4_7")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["image", "text"])
def test_greedy_tokens_equal_transformers_generate(hybrid, name, kind):
    ckpt, model = hybrid(name)
    inputs = _prompts(ckpt.processor)[kind]
    new = 6
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=ckpt.stop_ids,
                             pad_token_id=ckpt.stop_ids[0])
    reference = [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in ckpt.stop_ids]
    embeds = prompt_embeddings(model, inputs)
    positions, delta = prompt_positions(model, inputs)
    if kind == "image" and ckpt.variant.canvas_positions:
        assert delta < 0  # canvas positions are compact: decode continues below the sequence index
    step = HybridLanguageModelStep(model, max_context=160, max_chunk=32)
    cache = StateCache(step.spec)
    ours = greedy_generate(step, cache, embeds, positions, delta, model.get_input_embeddings().weight,
                           ckpt.stop_ids, new, chunk=32)
    assert ours == reference
    assert len(set(reference)) > 1  # the tiny weights answer with more than one repeated token
