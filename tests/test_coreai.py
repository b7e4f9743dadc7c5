"""Core AI export + CoreAIBackend, run through `coreai.runtime` on this machine: every function against its torch
module (fp32), greedy tokens through the whole chain against the eager reference (images, prompts, two turns,
prefill chunks 7 and 128), int4 codes read back from the asset and tokens against the PyTorch model of the same
quantisation, weights stored once for both LLM functions, MiniCPM-o's audio asset and its state in the manifest,
and refusal of tampered or missing assets. (The audio chain itself, tokens against the eager reference, is in
tests/test_audio_chain.py.)

Coverage: tiny V-4.0 gets the full matrix (3 images x 2 prompts x chunks 7 and 128, plus a --prefill-chunk 7
export whose T = 7 function is checked directly); tiny o-4.5 gets 3 images x 1 prompt x both chunks and the
two-turn conversation. Chunk 7 on a chunk-128 export runs the prefill function padded (CoreAIBackend).
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export.bundle import audio_example
from export.coreai import StatefulLanguageModel, eager_logits, install_records, parity_calls, runtime_logits
from export.coreai_asset import AssetRunner, quantized_constants
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig, generate
from minicpm.prompt import Prompt
from minicpm.split import VisionStep
from runtime.backends.coreai_backend import CoreAIBackend
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import noise_image
from tests.export_pool import Quantized

MAX_CONTEXT = 640
IMAGES = [noise_image(200, 150, 1), noise_image(640, 480, 2), noise_image(300, 900, 3)]  # last two are sliced
PROMPTS = ["What is in this image?", "Describe the colours."]
FP32 = ["--precision", "fp32"]
AWQ = Quantized("tiny-minicpm-o-4.5", ("--samples", "4", "--seq-len", "64"))  # asymmetric AWQ, on the export pool
EXPORTS = {  # key -> (model, extra arguments)
    "v4": ("tiny-minicpm-v-4", ["--quant", "none"]),
    "o45": ("tiny-minicpm-o-4.5", ["--quant", "none"]),
    "v4-chunk7": ("tiny-minicpm-v-4", ["--quant", "none", "--prefill-chunk", "7"]),
    "v4-rtn": ("tiny-minicpm-v-4", ["--quant", "int4-rtn", "--lm-head", "int8", "--group-size", "32"]),
    "o45-awq": (AWQ, []),
}
EXPORTS_AHEAD = [("coreai", model, "--max-context", str(MAX_CONTEXT), *extra, *FP32)  # queued at session start
                 for model, extra in EXPORTS.values()]


@pytest.fixture(scope="module")
def awq_dir(exports):
    """tiny o-4.5 through `python -m quant.awq` (asymmetric)."""
    return exports.quantized(AWQ)


@pytest.fixture(scope="module")
def exported(exports):
    """key -> export directory, through the session's export pool (each command once, in its own process, two at
    a time): the o45 command is tests/test_audio_chain.py's Core AI export too."""
    commands = {key: ("coreai", model, "--max-context", str(MAX_CONTEXT), *extra, *FP32)
                for key, (model, extra) in EXPORTS.items()}
    for command in commands.values():
        exports.start(*command)
    return lambda key: exports(*commands[key])  # one still queued runs in the test's thread (it would wait)


def reference(model, ckpt, messages, sampling) -> tuple[list[int], list[torch.Tensor]]:
    """Eager greedy tokens and the logits each step chose from."""
    logits = []
    hook = model.llm.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out[0, -1].detach().clone()))
    try:
        result = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
    finally:
        hook.remove()
    return result.token_ids, logits


def divergence(got: list[int], expected: list[int], logits: list[torch.Tensor]) -> tuple[int, float] | None:
    """None when equal, else the step where the tokens part and the reference's top1 - top2 margin there."""
    if got == expected:
        return None
    pairs = zip(got, expected, strict=False)
    step = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(expected)))
    if step >= len(logits):
        return step, float("inf")
    top = torch.topk(logits[step].double(), 2).values
    return step, float(top[0] - top[1])


# ----- every function against its torch module (fp32) -----------------------------------------------------


@pytest.mark.parametrize("key, name", [("v4", "tiny-minicpm-v-4"), ("o45", "tiny-minicpm-o-4.5"),
                                       ("v4-chunk7", "tiny-minicpm-v-4")])
def test_functions_match_torch_modules(exported, tiny, key, name):
    out = exported(key)
    manifest = read_manifest(out)
    assert manifest["format"] == "coreai" and manifest["model"]["dtype"] == "float32"
    assert {manifest["artifacts"][a]["format"] for a in ("vision", "llm")} == {"aimodel"}
    assert all(error < 1e-4 for error in manifest["parity"].values()), manifest["parity"]
    llm = manifest["artifacts"]["llm"]
    chunk = manifest["schedule"]["prefill_chunk"]
    assert set(llm["functions"]) == {"prefill", "decode"}
    state = manifest["schedule"]["coreai"]["state"]
    ckpt, model = tiny(name)
    layers = model.config.llm.num_hidden_layers
    assert state["names"] == [f"{k}_cache_{i}" for i in range(layers) for k in ("k", "v")]
    for function, tokens in (("prefill", chunk), ("decode", 1)):
        io = llm["functions"][function]
        shapes = {t["name"]: t["shape"] for t in io["inputs"]}
        assert shapes["inputs_embeds"] == [1, tokens, model.config.hidden_size]
        assert shapes["attention_mask"] == [1, 1, tokens, MAX_CONTEXT + tokens]
        assert [t["shape"] for t in io["states"]] == [state["shape"]] * len(state["names"])
        assert sorted(t["name"] for t in io["states"]) == sorted(state["names"])
    # vision: every slice of every test image through the backend (one slice per call) against VisionStep
    session = Session(out, "coreai")
    vision = VisionStep(model).eval()
    for img in IMAGES:
        prompt = ckpt.prompts.build([{"role": "user", "content": [img, "x"]}])
        batch = model.vision_inputs(prompt.pixel_values, prompt.tgt_sizes, pad_to=session.max_patches)
        with torch.no_grad():
            expected = vision(**batch).numpy()
        assert np.abs(session.backend.vision(**{k: v.numpy() for k, v in batch.items()}) - expected).max() < 1e-4
    # prefill + decode sharing one state, over a schedule that ends in a padded chunk in the slack, against the
    # eager stateful module (the same weights; run_layers of the split)
    wrapper = StatefulLanguageModel(model, MAX_CONTEXT, chunk, torch.float32).eval()
    calls = list(parity_calls(MAX_CONTEXT, chunk, model.config.hidden_size, np.float32, seed=chunk))
    with AssetRunner(out / "llm.aimodel") as runner:
        got = runtime_logits(runner, calls, wrapper.state_shape, np.float32)
    expected = eager_logits(wrapper, calls)
    assert max(np.abs(g - e).max() for g, e in zip(got, expected, strict=True)) < 1e-4


def test_both_functions_share_one_copy_of_the_weights(exported, tiny):
    """llm.aimodel holds prefill and decode; its size is one copy of the LLM weights (two would be twice)."""
    _, model = tiny("tiny-minicpm-v-4")
    step = StatefulLanguageModel(model, 8, 2, torch.float32).step
    weights = sum(p.numel() * 4 for p in {id(p): p for p in step.parameters()}.values())
    size = read_manifest(exported("v4"))["artifacts"]["llm"]["size"]
    assert weights < size < 1.2 * weights, (size, weights)


# ----- end to end through runtime.session --------------------------------------------------------------


@pytest.mark.parametrize("key, name, prompts", [("v4", "tiny-minicpm-v-4", PROMPTS),
                                                ("o45", "tiny-minicpm-o-4.5", PROMPTS[:1])])
def test_end_to_end_tokens_match_eager_reference(exported, tiny, key, name, prompts):
    ckpt, model = tiny(name)
    session = Session(exported(key))  # the export's own runtime: coreai
    assert session.backend.name == "coreai"
    sampling = SamplingConfig(max_new_tokens=32)
    for img in IMAGES:
        for text in prompts:
            messages = [{"role": "user", "content": [img, text]}]
            expected = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
            for chunk in (7, 128):
                session.chunk = chunk
                session.reset()
                got = session.ask(messages, sampling)
                assert got.token_ids == expected.token_ids, (img.size, text, chunk)
                assert got.text == expected.text


def test_native_chunk7_export_tokens_match(exported, tiny):
    ckpt, model = tiny("tiny-minicpm-v-4")
    session = Session(exported("v4-chunk7"), "coreai")
    sampling = SamplingConfig(max_new_tokens=32)
    for img in IMAGES[1:]:
        messages = [{"role": "user", "content": [img, PROMPTS[1]]}]
        expected = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids
        session.reset()
        assert session.ask(messages, sampling).token_ids == expected


@pytest.mark.parametrize("key, name", [("v4", "tiny-minicpm-v-4"), ("o45", "tiny-minicpm-o-4.5")])
def test_two_turn_conversation_reuses_the_state(exported, tiny, key, name):
    """Turn 2 carries an image and prefills only its own tokens over the state turn 1 left."""
    ckpt, model = tiny(name)
    session = Session(exported(key), "coreai")
    sampling = SamplingConfig(max_new_tokens=32)
    first = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    second = [{"role": "user", "content": [IMAGES[0], "Tell me more."]}]
    t1 = ckpt.prompts.build(first)
    a1_expected = generate(model, t1, ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids
    for chunk in (7, 128):
        session.chunk = chunk
        session.reset()
        a1 = session.ask(first, sampling)
        a2 = session.ask(second, sampling)
        t2 = ckpt.prompts.build_turn(second, first_image=1)
        offset = len(t1.input_ids) + len(a1.token_ids)
        whole = Prompt(t1.input_ids + a1.token_ids + t2.input_ids,
                       t1.image_bounds + [(s + offset, e + offset) for s, e in t2.image_bounds], t1.images + t2.images)
        assert a1.token_ids == a1_expected
        assert a2.token_ids == generate(model, whole, ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids, chunk


def test_reset_is_a_fresh_conversation(exported):
    out = exported("v4")
    session = Session(out, "coreai")
    messages = [{"role": "user", "content": [IMAGES[0], PROMPTS[1]]}]
    session.ask([{"role": "user", "content": [IMAGES[2], PROMPTS[0]]}], SamplingConfig(max_new_tokens=8))
    assert any(np.abs(a.numpy()).sum() > 0 for a in session.backend.state.values())
    session.reset()
    assert all(np.abs(a.numpy()).sum() == 0 for a in session.backend.state.values())
    fresh = Session(out, "coreai").ask(messages, SamplingConfig(max_new_tokens=16))
    assert session.ask(messages, SamplingConfig(max_new_tokens=16)).token_ids == fresh.token_ids


def test_o_export_describes_its_audio_state(exported, tiny):
    """audio.aimodel's encoder cache state: the manifest's audio_state (names, shape, dtype) is the asset's and the
    encoder's, the backend's state arrays follow it (written by a chunk, zeroed by reset); a V export has no audio
    and says so in one line."""
    out = exported("o45")
    manifest = read_manifest(out)
    _, model = tiny("tiny-minicpm-o-4.5")
    attn = model.apm.layers[0].self_attn
    state = manifest["schedule"]["coreai"]["audio_state"]
    assert state["names"] == [f"{k}_cache_{i}" for i in range(len(model.apm.layers)) for k in ("k", "v")]
    assert state["shape"] == [1, attn.num_heads, model.apm.max_source_positions, attn.head_dim]
    assert state["dtype"] == "float32"
    assert manifest["schedule"]["steps"]["audio"] == {"artifact": "audio", "function": "main", "frames": 50,
                                                      "tokens": 10, "pool": 5}
    audio = manifest["artifacts"]["audio"]
    assert audio["format"] == "aimodel" and list(audio["functions"]) == ["main"]
    io = audio["functions"]["main"]
    assert [t["name"] for t in io["inputs"]] == ["mel", "conv_mask", "position_ids", "attention_mask"]
    assert [t["name"] for t in io["outputs"]] == ["tokens"]
    assert {t["name"]: (t["shape"], t["dtype"]) for t in io["states"]} == \
        dict.fromkeys(state["names"], (state["shape"], state["dtype"]))
    assert manifest["parity"]["audio"] < 1e-4
    backend = Session(out, "coreai").backend
    assert backend.owns_audio_cache and set(backend.audio_state) == set(state["names"])
    tokens, keys, values = backend.audio(**{k: v.numpy() for k, v in audio_example(model)[0].items()})
    assert tokens.shape == (10, model.config.hidden_size) and keys is None and values is None
    assert all(np.abs(a.numpy()).sum() > 0 for a in backend.audio_state.values())
    backend.reset()
    assert all(np.abs(a.numpy()).sum() == 0 for a in backend.audio_state.values())
    v4 = exported("v4")
    plain = read_manifest(v4)
    assert "audio" not in plain["artifacts"] and "audio_state" not in plain["schedule"]["coreai"]
    with pytest.raises(UserError, match="this Core AI export has no audio asset"):
        Session(v4, "coreai").backend.audio()


# ----- int4 --------------------------------------------------------------------------------------------


def _records(key: str, awq_dir: Path):
    """The records and the PyTorch model of the same quantisation the export was made from."""
    from minicpm.checkpoint import Checkpoint
    from quant import QuantConfig, rtn_quantize
    from quant.checkpoint import load_quantized

    if key == "v4-rtn":  # RTN is deterministic: the exporter's records, recomputed
        ckpt = Checkpoint.open("tiny-minicpm-v-4")
        model, _ = ckpt.load_model("float32")
        result = rtn_quantize(model, QuantConfig(group_size=32, lm_head="int8"))
    else:
        ckpt = Checkpoint.open(awq_dir)
        result = load_quantized(awq_dir, "float32")
    records = {n: r for n, r in result.records.items() if n.startswith("llm.")}
    return ckpt, result.model, records


@pytest.mark.parametrize("key", ["v4-rtn", "o45-awq"])
def test_int4_asset_holds_the_records_and_gives_the_quantized_models_tokens(exported, awq_dir, key):
    out = exported(key)
    manifest = read_manifest(out)
    ckpt, model, records = _records(key, awq_dir)
    quant = manifest["quantization"]
    assert quant["method"] == ("int4-rtn" if key == "v4-rtn" else "int4-awq") and quant["layers"] == 14
    assert quant["lm_head"] == ("int8" if key == "v4-rtn" else "keep")
    assert manifest["parity"]["llm"] < 1e-4
    # codes, scales and zero points read back from each function of the stored program (stored transposed,
    # [in, out]), bit for bit
    expected = sorted((r.codes.numpy().tobytes(), r.scales.float().numpy().tobytes(), r.zeros.numpy().tobytes())
                      for r in records.values())
    assert len(expected) == (15 if key == "v4-rtn" else 14)
    for function in ("prefill", "decode"):
        stored = sorted((np.ascontiguousarray(c.T, np.uint8).tobytes(), np.ascontiguousarray(s.T, np.float32).tobytes(),
                         np.ascontiguousarray(z.T, np.uint8).tobytes())
                        for c, s, z in quantized_constants(out / "llm.aimodel", function))
        assert stored == expected, function
    # greedy tokens through the chain against the eager model holding the same quantised weights
    session = Session(out, "coreai")
    sampling = SamplingConfig(max_new_tokens=32)
    parted = []
    for img in IMAGES:
        messages = [{"role": "user", "content": [img, PROMPTS[0]]}]
        tokens, logits = reference(model, ckpt, messages, sampling)
        session.reset()
        found = divergence(session.ask(messages, sampling).token_ids, tokens, logits)
        if found:
            parted.append(f"{img.size}: step {found[0]}, reference top1 - top2 margin {found[1]:.3g}")
            assert found[1] < 1e-3, parted[-1]  # same weights in fp32: only an exact near-tie may flip
    if parted:
        warnings.warn(f"{key}: int4 chain parts from the quantised reference at " + "; ".join(parted), stacklevel=1)


def test_install_records_refuses_mismatched_weights(tiny_path):
    from minicpm.checkpoint import Checkpoint
    from quant import QuantConfig, rtn_quantize

    model, _ = Checkpoint.open("tiny-minicpm-v-4").load_model("float32")
    records = rtn_quantize(model, QuantConfig(group_size=32)).records
    name = "llm.model.layers.0.mlp.down_proj"
    with torch.no_grad():
        model.get_submodule(name).weight.add_(1.0)
    with pytest.raises(UserError, match=f"quantisation record {name} does not match the model's weight"):
        install_records(model, {name: records[name]}, torch.float32)


# ----- refusals ----------------------------------------------------------------------------------------


def test_tampered_or_missing_assets_are_refused_before_loading(exported, tmp_path):
    source = exported("v4")
    tampered = tmp_path / "tampered"
    shutil.copytree(source, tampered)
    with open(tampered / "llm.aimodel" / "main.mlirb", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(UserError, match=r"artifact 'llm' \(llm.aimodel\) does not match its sha256"):
        Session(tampered, "coreai")
    missing = tmp_path / "missing"
    shutil.copytree(source, missing)
    shutil.rmtree(missing / "vision.aimodel")
    with pytest.raises(UserError, match=r"artifact 'vision' is missing \(vision.aimodel\)"):
        Session(missing, "coreai")
    manifest = read_manifest(source)
    with pytest.raises(UserError, match="backend coreai runs Core AI exports"):
        CoreAIBackend(source, {**manifest, "format": "onnx"})
