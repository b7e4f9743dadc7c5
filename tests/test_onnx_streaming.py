"""export.onnx reads the model part by part (export/onnx_weights.py, minicpm/lazy_model.py): each part holds
exactly the weights a full load holds, and nothing outside the part being exported is ever in memory."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from export import onnx_weights
from export.onnx_weights import AUDIO, EMBEDDING, LLM, VISION, LoadedWeights, StreamedWeights
from minicpm.checkpoint import Checkpoint, load_model, load_skeleton
from minicpm.errors import UserError

CASES = {  # id -> (model, export dtype, exporter arguments)
    "v4-rtn-int8head": ("tiny-minicpm-v-4", torch.float32, {"quant": "int4-rtn", "lm_head": "int8"}),
    "v45-float-fp16": ("tiny-minicpm-v-4.5", torch.float16, {"quant": "none"}),
    "o26-rtn-audio-sym": ("tiny-minicpm-o-2.6", torch.float32,
                          {"quant": "int4-rtn", "quantize_audio": True, "symmetric": True, "group_size": 32}),
}


def _args(**given) -> argparse.Namespace:
    defaults = {"quant": None, "group_size": None, "symmetric": False, "lm_head": None, "samples": 32, "calib": None,
                "quantize_audio": False, "accuracy_level": 4}
    return argparse.Namespace(**{**defaults, **given})


def _held(model: torch.nn.Module) -> set[str]:
    """Names of the parameters and MatMulNBits tensors that have memory (not on the meta device)."""
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if "rotary_emb" not in n)]
    return {n for n, t in tensors if t is not None and t.device.type != "meta"}


@pytest.mark.parametrize("case", CASES)
def test_parts_hold_the_weights_of_a_full_load_and_nothing_else(case):
    name, dtype, given = CASES[case]
    ckpt = Checkpoint.open(name)
    loaded = LoadedWeights(ckpt, _args(**given), dtype, 0)
    streamed = StreamedWeights(ckpt, _args(**given), dtype, 0)
    assert streamed.records.keys() == loaded.records.keys()
    assert streamed.quant.manifest() == loaded.quant.manifest()
    assert not _held(streamed.model)
    full = loaded.model.state_dict()
    for part in (VISION, AUDIO, LLM):
        with streamed.part(part):
            held = _held(streamed.model)
            assert held == {n for n in full if n.startswith(part) and n != EMBEDDING and n in held}
            assert held or not hasattr(streamed.model, "apm") and part == AUDIO
            state = streamed.model.state_dict()
            for n in held:  # MatMulNBits codes, scales and zero points included: the graphs' bytes
                assert state[n].dtype == full[n].dtype and torch.equal(state[n], full[n]), n
        assert not _held(streamed.model)
    assert torch.equal(streamed.embedding_table().to(dtype), loaded.embedding_table())


def test_streaming_is_chosen_only_when_nothing_needs_the_whole_model(monkeypatch):
    made = []
    monkeypatch.setattr(onnx_weights, "LoadedWeights", lambda *a: made.append("loaded"))
    monkeypatch.setattr(onnx_weights, "StreamedWeights", lambda *a: made.append("streamed"))
    ckpt = Checkpoint.open("tiny-minicpm-v-4")
    for quant in ("int4-rtn", "none", None, "int4-awq"):
        onnx_weights.open_weights(ckpt, _args(quant=quant), torch.float32, 0)
    assert made == ["streamed", "streamed", "streamed", "loaded"]


def test_streamed_refusals_match_the_full_load():
    ckpt = Checkpoint.open("tiny-minicpm-v-4")
    for given in ({"quant": "none", "group_size": 32}, {"quant": "int4-rtn", "calib": "x.jsonl"},
                  {"quant": "int4-rtn", "quantize_audio": True}):
        messages = []
        for kind in (LoadedWeights, StreamedWeights):
            with pytest.raises(UserError) as e:
                kind(ckpt, _args(**given), torch.float32, 0)
            messages.append(str(e.value))
        assert messages[0] == messages[1]


def test_skeleton_checks_the_checkpoint_as_strictly_as_a_load(tmp_path):
    src = Checkpoint.open("tiny-minicpm-v-4").path
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors.pop("llm.model.norm.weight")
    tensors["llm.extra.weight"] = torch.zeros(2)
    tensors["vpm.post_layernorm.bias"] = torch.zeros(3)
    save_file(tensors, str(bad / "model.safetensors"))
    messages = []
    for load in (load_model, load_skeleton):
        with pytest.raises(UserError) as e:
            load(bad)
        messages.append(str(e.value))
    assert messages[0] == messages[1]
    assert "missing keys: llm.model.norm.weight" in messages[0] and "llm.extra.weight" in messages[0]
    assert all(p.device.type == "meta" for p in load_skeleton(src)[0].parameters())
