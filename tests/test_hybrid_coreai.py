"""Core AI export of MiniCPM-V 4.6 / 4.7 with the per-layer state as Core AI state and the one-slice vision step,
run through `coreai.runtime` on this machine: both LLM functions against the torch step over the session's schedule,
the vision asset against the torch step, the manifest's state sections, greedy tokens through the chain against
transformers' generate (text: one turn and two turns, prefill chunks 7 and 128: 7 runs the T = 128 function padded,
valid_tokens keeping the pads out; a sliced image prompt), the backend owning the state (the session holds none),
reset, and the refusals. The ExecuTorch hybrid export: tests/test_hybrid_executorch.py."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from export.coreai_asset import AssetRunner
from export.stateful_hybrid import STEP_INPUTS, schedule_calls
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig
from minicpm.hybrid_step import HybridLanguageModelStep
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import noise_image
from tests.test_hybrid_images import _generate
from tests.test_hybrid_onnx import FIRST, SECOND, _reference

NAMES = ["tiny-minicpm-v-4.6", "tiny-minicpm-v-4.7"]
MAX_CONTEXT, CHUNK = 256, 128
ARGS = ("--max-context", str(MAX_CONTEXT), "--quant", "none")
EXPORTS_AHEAD = [("coreai", name, *ARGS) for name in NAMES]  # queued at session start


@pytest.fixture(scope="module")
def exported(exports):
    for name in NAMES:  # both start at once (two processes) on first use
        exports.start("coreai", name, *ARGS)
    return lambda name: exports("coreai", name, *ARGS)


@pytest.mark.parametrize("name", NAMES)
def test_functions_match_the_torch_step(exported, hybrid, name):
    """prefill (T = 128) and decode (T = 1) sharing one set of state arrays, over two conversations of the session's
    calls (full chunk, decodes, a padded chunk, a chunk whose pads run into the slack), against the unmodified
    torch step of the original (untransposed) model with a host-held StateCache."""
    out = exported(name)
    manifest = read_manifest(out)
    assert manifest["parity"]["llm"] < 1e-4  # measured by the exporter through the runtime
    _, model = hybrid(name)
    step = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).eval()
    shapes = manifest["schedule"]["coreai"]["state"]["tensors"]
    from coreai.runtime import NDArray  # noqa: PLC0415

    errors = {"prefill": 0.0, "decode": 0.0}
    with AssetRunner(out / "llm.aimodel") as runner:
        for conversation in schedule_calls(step, CHUNK, torch.float32, seed=1):
            state = {n: NDArray(np.zeros(t["shape"], dtype=t["dtype"])) for n, t in shapes.items()}
            for tokens, inputs, expected in conversation:
                function = "decode" if tokens == 1 else "prefill"
                got = runner(function, {k: v.numpy() for k, v in inputs.items()}, state)["logits"]
                errors[function] = max(errors[function], float(np.abs(got - expected.numpy()).max()))
    assert max(errors.values()) < 1e-4, errors


def test_manifest_describes_the_state_and_its_owner(exported, hybrid):
    name = NAMES[0]
    manifest = read_manifest(exported(name))
    _, model = hybrid(name)
    spec = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).spec
    schedule = manifest["schedule"]
    assert schedule["state"] == spec.to_dict() and "kv_cache" not in schedule
    assert schedule["modalities"] == ["text", "image"]
    note = schedule["coreai"]["state"]
    assert note["owner"] == "backend" and list(note["tensors"]) == spec.names and note["slack_slots"] == CHUNK
    assert note["tensors"]["past_keys"]["shape"][2] == MAX_CONTEXT + CHUNK
    assert note["tensors"]["recurrent_state"]["dtype"] == "float32"
    llm = manifest["artifacts"]["llm"]
    for function, tokens in (("prefill", CHUNK), ("decode", 1)):
        io = llm["functions"][function]
        assert [t["name"] for t in io["inputs"]] == STEP_INPUTS and [t["name"] for t in io["outputs"]] == ["logits"]
        assert [t["name"] for t in io["states"]] == spec.names and io["inputs"][0]["shape"][1] == tokens
    assert schedule["steps"]["prefill"] == {"artifact": "llm", "function": "prefill", "tokens": CHUNK}
    assert (exported(name) / "token_embedding.bin").is_file() and (exported(name) / "processor_config.json").is_file()


@pytest.mark.parametrize("chunk", [7, 128])
@pytest.mark.parametrize("name", NAMES)
def test_greedy_tokens_equal_transformers_generate(exported, hybrid, name, chunk):
    """A text prompt, then a second turn on the state the backend kept, both against transformers' generate."""
    ckpt, model = hybrid(name)
    session = Session(exported(name), "coreai")
    assert session.backend.owns_state and session.state.state == {}  # the host keeps no copy
    session.chunk = chunk  # 7: each call runs the T = 128 function padded
    sampling = SamplingConfig(max_new_tokens=8)
    a1 = session.ask(FIRST, sampling)
    t1 = ckpt.prompts.build(FIRST)
    assert len(t1.input_ids) > 7 and a1.token_ids == _reference(ckpt, model, t1.input_ids, 8)
    assert len(set(a1.token_ids)) > 1
    a2 = session.ask(SECOND, sampling)
    t2 = ckpt.prompts.build_turn(SECOND, 0)
    pending = a1.token_ids[-1:] if a1.stats["finish_reason"] == "length" else []
    assert a2.stats["prompt_tokens"] == len(pending) + len(t2.input_ids)  # only the new turn was prefilled
    assert a2.token_ids == _reference(ckpt, model, t1.input_ids + a1.token_ids + t2.input_ids, 8)


def test_vision_asset_matches_the_torch_step(exported, hybrid):
    """The manifest's steps.vision is the ONNX export's layout; the asset through the session's backend equals
    HybridVisionStep within 1e-4 on a source image and a grid cell (each padded to the row)."""
    from export.onnx_hybrid import vision_facts
    from minicpm.hybrid_vision import HybridVisionStep, split_slices

    name = NAMES[0]
    ckpt, model = hybrid(name)
    manifest = read_manifest(exported(name))
    step = manifest["schedule"]["steps"]["vision"]
    torch_step = HybridVisionStep(model, "16x").eval()
    assert step == {**vision_facts(torch_step, "16x", 1200), "function": "main"}
    assert manifest["parity"]["vision"] < 1e-4  # measured by the exporter through the runtime
    assert [t["shape"] for t in manifest["artifacts"]["vision"]["inputs"]] == [[1, 3, 14, 14 * 1200], [1200],
                                                                               [1200], [1200]]
    backend = Session(exported(name), "coreai").backend
    slices = split_slices(ckpt.processor.image_processor([noise_image(300, 900, seed=3)], return_tensors="pt"))
    for one in (slices[0], slices[-1]):
        inputs = torch_step.vision_inputs(one, 1200)
        with torch.no_grad():
            expected = torch_step(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        got = backend.vision(**inputs)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4
        assert np.abs(expected).max() > 1e-2  # not all padding


@pytest.mark.parametrize("name", NAMES)
def test_image_prompt_greedy_tokens_equal_transformers_generate(exported, hybrid, name):
    """A sliced image (source + 1x2 grid) through the whole Core AI chain: vision per slice, scatter, chunked
    prefill with the state in the runtime (4.7: canvas positions), decode; against generate with the processor."""
    from minicpm.v4_6 import prompt_inputs

    ckpt, model = hybrid(name)
    session = Session(exported(name), "coreai")
    image = noise_image(640, 480, seed=1)
    got = session.ask([{"role": "user", "content": [image, "Describe it."]}], SamplingConfig(max_new_tokens=8))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    inputs = dict(prompt_inputs(ckpt.processor, chat, images=[image]))
    assert got.stats["slices"] == 3 and got.stats["prompt_tokens"] == inputs["input_ids"].shape[1] > CHUNK
    assert got.token_ids == _generate(ckpt, model, inputs, 8) and len(set(got.token_ids)) > 1


def test_reset_gives_a_fresh_conversation(exported):
    session = Session(exported(NAMES[0]), "coreai")
    sampling = SamplingConfig(max_new_tokens=6)
    first = session.ask(FIRST, sampling).token_ids
    session.ask(SECOND, sampling)
    session.reset()
    assert session.cache_len == 0 and session.state.length == 0
    assert session.ask(FIRST, sampling).token_ids == first


def test_tampered_asset_is_refused_before_loading(exported, tmp_path, monkeypatch):
    copy = tmp_path / "export"
    shutil.copytree(exported(NAMES[0]), copy)
    with open(copy / "llm.aimodel" / "main.mlirb", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    from coreai.authoring import AIModelAsset  # noqa: PLC0415

    def never(*args, **kwargs):
        raise AssertionError("the tampered asset was loaded")

    monkeypatch.setattr(AIModelAsset, "load", never)
    with pytest.raises(UserError, match=r"artifact 'llm' \(llm.aimodel\) does not match its sha256"):
        Session(copy, "coreai")


def test_bad_arguments_are_one_line_errors(tmp_path):
    """Refused before anything is loaded or written (int4 itself: tests/test_hybrid_int4.py)."""
    from export.coreai import main  # noqa: PLC0415

    with pytest.raises(UserError, match=r"^--lm-head int8 applies to int4 quantisation, not --quant none$"):
        main(["--model", NAMES[0], "--out", str(tmp_path / "x"), "--quant", "none", "--lm-head", "int8"])
    with pytest.raises(UserError, match=r"^--max-patches 1000 must be a multiple of 16"):
        main(["--model", NAMES[0], "--out", str(tmp_path / "x"), "--quant", "none", "--max-patches", "1000"])
    assert not (tmp_path / "x").exists()
