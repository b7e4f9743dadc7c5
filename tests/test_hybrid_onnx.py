"""ONNX export of MiniCPM-V 4.6 / 4.7 and the runtime's schedule with per-layer state: the graph against the torch
step, the manifest's state section, greedy tokens through the ONNX chain against transformers' generate on text
(one turn and two turns, prefill chunks 7 and 128), the context-full policy and the refusals. Images through the
chain: tests/test_hybrid_images.py (same exports)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from export.onnx_hybrid import parity_examples, step_names
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig
from minicpm.hybrid_step import HybridLanguageModelStep
from minicpm.v4_6 import prompt_inputs
from runtime.manifest import read_manifest
from runtime.session import ContextFull, Session
from tests.conftest import noise_image, record_llm_calls

NAMES = ["tiny-minicpm-v-4.6", "tiny-minicpm-v-4.7"]
MAX_CONTEXT, CHUNK = 768, 128  # room for test_hybrid_images' three images (590 prompt tokens)
EXPORTS_AHEAD = [("onnx", name, "--max-context", str(MAX_CONTEXT)) for name in NAMES]  # queued at session start
FIRST = [{"role": "user", "content": ["Hello! How can I help you today?"]}]
SECOND = [{"role": "user", "content": ["Tell me more about the weather."]}]


@pytest.fixture(scope="module")
def exported(exports):
    """name -> export directory; both exports start at once (two processes) on first use."""
    for name in NAMES:
        exports.start("onnx", name, "--max-context", str(MAX_CONTEXT))
    return lambda name: exports("onnx", name, "--max-context", str(MAX_CONTEXT))


def _reference(ckpt, model, ids: list[int], new: int) -> list[int]:
    """transformers' own greedy generate on the whole token sequence (stop tokens dropped)."""
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new,
                             do_sample=False, eos_token_id=ckpt.stop_ids, pad_token_id=ckpt.stop_ids[0])
    return [t for t in out[0, len(ids):].tolist() if t not in ckpt.stop_ids]


@pytest.mark.parametrize("name", NAMES)
def test_graph_matches_torch_step(exported, hybrid, name):
    out = exported(name)
    manifest = read_manifest(out)
    assert manifest["parity"]["llm"] < 1e-4  # measured by the exporter on the same three cases
    _, model = hybrid(name)
    step = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).eval()
    session = Session(out, "onnxruntime")
    inputs, _ = step_names(step.spec)
    # T = chunk, a padded last chunk (3 pad rows), T = 1 at the last slot; and T = 7 (the other chunk the tests run)
    cases = parity_examples(step, CHUNK, torch.float32) + parity_examples(step, 7, torch.float32)[1:2]
    for args in cases:
        with torch.no_grad():
            expected = step(*args)
        got = session.backend.llm(**{n: a.numpy() for n, a in zip(inputs, args, strict=True)})
        for g, e in zip(got, expected, strict=True):
            assert np.abs(g - e.numpy()).max() < 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_manifest_describes_the_state(exported, hybrid, name):
    manifest = read_manifest(exported(name))
    _, model = hybrid(name)
    spec = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).spec
    schedule = manifest["schedule"]
    assert schedule["state"] == spec.to_dict()
    assert "kv_cache" not in schedule and schedule["modalities"] == ["text", "image"] and "vision" in schedule["steps"]
    assert schedule["positions"]["kind"] == "mrope" and schedule["positions"]["canvas"] == name.endswith("4.7")
    llm = manifest["artifacts"]["llm"]
    inputs, outputs = step_names(spec)
    assert [t["name"] for t in llm["inputs"]] == inputs and [t["name"] for t in llm["outputs"]] == outputs
    assert outputs[1:] == ["new_keys", "new_values", "new_conv_state", "new_recurrent_state"]
    assert manifest["quantization"]["method"] == "none"
    assert schedule["steps"]["prefill"]["min_tokens"] == 1  # the graph pads T to whole sub-chunks itself


@pytest.mark.parametrize("chunk", [7, 128])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_transformers_generate(exported, hybrid, name, chunk):
    ckpt, model = hybrid(name)
    session = Session(exported(name), "onnxruntime")
    session.chunk = chunk  # the graph's token count is dynamic up to the export's --prefill-chunk
    calls = record_llm_calls(session)
    new = 12
    ids = prompt_inputs(ckpt.processor, [{"role": "user", "content": [{"type": "text", "text": FIRST[0]["content"][0]}]}
                                         ])["input_ids"][0].tolist()
    got = session.ask(FIRST, SamplingConfig(max_new_tokens=new))
    assert got.stats["prompt_tokens"] == len(ids) and len(ids) > chunk or chunk == CHUNK
    # every chunk at its own length: the last one is not padded (min_tokens = 1)
    prefill = [c["inputs_embeds"].shape[1] for c in calls[:len(calls) - len(got.token_ids) + 1]]
    assert prefill == [min(chunk, len(ids) - start) for start in range(0, len(ids), chunk)]
    assert got.token_ids == _reference(ckpt, model, ids, new)
    assert len(set(got.token_ids)) > 1


@pytest.mark.parametrize("chunk", [7, 128])
@pytest.mark.parametrize("name", NAMES)
def test_two_turn_conversation_reuses_the_state(exported, hybrid, name, chunk):
    ckpt, model = hybrid(name)
    session = Session(exported(name), "onnxruntime")
    session.chunk = chunk
    sampling = SamplingConfig(max_new_tokens=8)
    a1 = session.ask(FIRST, sampling)
    before = session.cache_len
    a2 = session.ask(SECOND, sampling)
    t1 = ckpt.prompts.build(FIRST)
    t2 = ckpt.prompts.build_turn(SECOND, 0)
    pending = a1.token_ids[-1:] if a1.stats["finish_reason"] == "length" else []
    # only the new turn was prefilled (after answer 1's last token when max_new_tokens cut it before it was fed)
    assert before == len(t1.input_ids) + len(a1.token_ids) - len(pending)
    assert a2.stats["prompt_tokens"] == len(pending) + len(t2.input_ids)
    assert ckpt.tokenizer.convert_ids_to_tokens(t2.input_ids[:2]) == ["<|im_end|>", "Ċ"]  # closes answer 1
    # The eager reference sees the whole conversation as one prompt: turn 1, answer 1, turn 2.
    assert a2.token_ids == _reference(ckpt, model, t1.input_ids + a1.token_ids + t2.input_ids, 8)


def test_context_full_policy(exported):
    """Only the full-attention KV fills: "stop" ends the answer at max_context slots, "error" is one line. A long
    prompt (622 tokens, prefilled in chunks) leaves ~150 slots to decode."""
    out = exported(NAMES[1])
    session = Session(out, "onnxruntime", on_context_full="stop")
    session.manifest["tokenizer"]["stop_ids"] = [-1]  # the tiny weights may say stop early: answer until full
    sizes = {name: tuple(t.shape) for name, t in session.state.state.items()}
    long = [{"role": "user", "content": [" ".join([FIRST[0]["content"][0]] * 60)]}]
    result = session.ask(long, SamplingConfig(max_new_tokens=MAX_CONTEXT))
    assert result.stats["finish_reason"] == "context_full" and session.cache_len == MAX_CONTEXT
    assert {name: tuple(t.shape) for name, t in session.state.state.items()} == sizes  # fixed-size states
    with pytest.raises(ContextFull, match="context full"):
        session.ask(SECOND, SamplingConfig(max_new_tokens=4))
    strict = Session(out, "onnxruntime")
    strict.manifest["tokenizer"]["stop_ids"] = [-1]
    with pytest.raises(ContextFull, match=r"^context full after \d+ new tokens"):
        strict.ask(long, SamplingConfig(max_new_tokens=MAX_CONTEXT))


def test_tampered_graph_is_refused_before_loading(exported, tmp_path, monkeypatch):
    copy = tmp_path / "export"
    shutil.copytree(exported(NAMES[0]), copy)
    with open(copy / "llm.onnx", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    import onnxruntime  # noqa: PLC0415

    def never(*args, **kwargs):
        raise AssertionError("the tampered graph was loaded")

    monkeypatch.setattr(onnxruntime, "InferenceSession", never)
    with pytest.raises(UserError, match=r"artifact 'llm' \(llm\.onnx\) does not match its sha256"):
        Session(copy, "onnxruntime")


def test_refusals(exported, tmp_path):
    """What an export's schedule does not list is one line: images on a text-only export (modalities without
    "image"), video on any hybrid export; an int8 head without int4 (int4 itself: tests/test_hybrid_int4.py)."""
    from export.onnx import main  # noqa: PLC0415

    session = Session(exported(NAMES[0]), "onnxruntime")
    with pytest.raises(UserError, match=r"^this minicpm-v-4.6 export takes text, image only: video input needs a "
                                        r"video step"):
        session.ask([{"role": "user", "content": [{"type": "video", "frames": [noise_image(64, 64)]}, "And?"]}],
                    SamplingConfig())
    session.manifest["schedule"]["modalities"] = ["text"]  # as a text-only export lists them
    with pytest.raises(UserError, match=r"^this minicpm-v-4.6 export takes text only: image input") as e:
        session.ask([{"role": "user", "content": [noise_image(64, 64), "What is this?"]}], SamplingConfig())
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"^--lm-head int8 applies to int4 quantisation, not --quant none$"):
        main(["--model", NAMES[0], "--out", str(tmp_path / "x"), "--quant", "none", "--lm-head", "int8"])
    assert not (tmp_path / "x").exists()
