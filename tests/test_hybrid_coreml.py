"""Core ML export of MiniCPM-V 4.6 (the hybrid family), int4 RTN with an int8 head, checked where Linux can check it:
the packages' structure (functions, states, I/O, ops kept in float32, weights stored once for both functions), every
quantised Linear's codes, scales and zero points read back from llm.mlpackage bit for bit, the manifest, the parity
the exporter measured on the converted module, refusals (tampered or missing package, bad argument combinations),
and the Core ML backend's hybrid path driven end to end by a stand-in for `MLModel` that runs the converted torch
modules (greedy tokens of an image prompt against transformers' generate on the same int4 weights). Core ML itself
runs the packages on Apple platforms only."""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpm.errors import UserError
from minicpm.generation import SamplingConfig
from quant.layout import KEPT_FLOAT
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import noise_image
from tests.test_coreml import _program, _tensors
from tests.test_hybrid_images import _generate

ct = pytest.importorskip("coremltools")

NAME = "tiny-minicpm-v-4.6"  # 4.7 has the same text model; its canvas positions are host side (test_hybrid_coreai)
MAX_CONTEXT, CHUNK = 320, 32  # room for a sliced image's prompt; a small chunk keeps the conversion short
GROUP = 32  # the tiny model's hidden size is 64: group 128 would leave most of its Linears float
# one export for the whole module (the suite's time budget): int4 RTN (deterministic, so the tests recompute the
# records) with the Core ML default head, per-row int8
ARGS = ("--max-context", str(MAX_CONTEXT), "--prefill-chunk", str(CHUNK), "--quant", "int4-rtn", "--group-size",
        str(GROUP))
EXPORTS_AHEAD = [("coreml", NAME, *ARGS)]  # queued at session start
STEP_INPUTS = ["inputs_embeds", "position_ids", "attention_mask", "last_index", "valid_tokens"]


@pytest.fixture(scope="module")
def exported(exports) -> Path:
    return exports("coreml", NAME, *ARGS)


@functools.cache
def quantized() -> tuple:
    """(checkpoint, model, records): the tiny model with the export's int4 RTN weights (and int8 head) installed,
    exactly as the exporter prepares it: the eager reference of the same quantisation."""
    from export.coreml_weights import prepare_model
    from minicpm.v4_6 import HybridCheckpoint

    ckpt = HybridCheckpoint.open(NAME)
    model, records, _ = prepare_model(ckpt, "int4-rtn", GROUP)
    return ckpt, model, records


def _op_name(record: str) -> str:
    """Record `model.language_model.layers.0.mlp.up_proj` -> converted weight `p_step_layers_0_mlp_up_proj_weight`."""
    return "p_" + ("step." + record.removeprefix("model.language_model.")).replace(".", "_") + "_weight"


def _state_shapes(model) -> dict[str, tuple[tuple[int, ...], str]]:
    """The package states the model implies: per-layer KV with slack, then the spec's conv and recurrent tensors."""
    from minicpm.hybrid_step import HybridLanguageModelStep

    spec = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).spec
    full, heads, _, head_dim = spec["past_keys"].shape
    states = {f"{kind}_cache_{i}": ((1, heads, MAX_CONTEXT + CHUNK, head_dim), "FLOAT16")
              for i in range(full) for kind in "kv"}
    states.update({n: (tuple(spec[n].shape), "FLOAT16") for n in ("conv_state", "recurrent_state")})
    return states


def test_llm_package_functions_io_and_states(exported, hybrid):
    _, model = hybrid(NAME)
    text = model.config.text_config
    spec = ct.utils.load_spec(str(exported / "llm.mlpackage"))
    assert spec.specificationVersion >= 9  # iOS 18: states
    desc = spec.description
    assert [f.name for f in desc.functions] == ["prefill", "decode"] and desc.defaultFunctionName == "decode"
    states = _state_shapes(model)
    assert len(states) == 6  # tiny: two full-attention layers (k, v each), conv and recurrent
    for function, tokens in zip(desc.functions, (CHUNK, 1), strict=True):
        inputs = _tensors(function.input)
        assert list(inputs) == STEP_INPUTS
        assert inputs == {"inputs_embeds": ((1, tokens, text.hidden_size), "FLOAT16"),
                          "position_ids": ((3, tokens), "INT32"),
                          "attention_mask": ((1, 1, tokens, MAX_CONTEXT + tokens), "FLOAT16"),
                          "last_index": ((1,), "INT32"), "valid_tokens": ((1,), "INT32")}
        assert _tensors(function.output) == {"logits": ((1, text.vocab_size), "FLOAT16")}
        assert _tensors(function.state, "state") == states  # in this order
    meta = desc.metadata.userDefined
    assert meta["quantization"] == "int4-rtn" and meta["group_size"] == str(GROUP) and meta["lm_head"] == "int8"
    assert meta["states"] == ",".join(states)


def test_state_writes_and_float32_islands(exported, hybrid):
    """Every state read once and written once per call; the KV rows through slice_update at the dynamic slot (no
    scatter); RMSNorm and the delta rule's cumulative decay in float32 inside the fp16 program, matmuls fp16; every
    int4 / int8 weight dequantises to fp16 straight into one fp16 matmul, x @ W^T (none inside a float32 island)."""
    from coremltools.converters.mil.mil import types

    _, model = hybrid(NAME)
    linear = model.config.text_config.layer_types.count("linear_attention")
    program = _program(exported / "llm.mlpackage")
    for name in ("prefill", "decode"):
        function = program.functions[name]
        ops = [op.op_type for op in function.operations]
        assert ops.count("read_state") == ops.count("coreml_update_state") == 6
        assert ops.count("slice_update") >= 4 + 1  # k, v of two layers + the mask's new columns
        assert "scatter" not in ops and "scatter_nd" not in ops
        assert {op.outputs[0].dtype for op in function.find_ops(op_type="reduce_mean")} == {types.fp32}
        cumsums = function.find_ops(op_type="cumsum")
        assert len(cumsums) >= linear and {op.outputs[0].dtype for op in cumsums} == {types.fp32}
        assert types.fp16 in {op.outputs[0].dtype for op in function.find_ops(op_type="linear")}
        for op in function.find_ops(op_type="constexpr_blockwise_shift_scale"):
            assert op.outputs[0].dtype == types.fp16
            assert [(c.op_type, c.outputs[0].dtype, c.transpose_y.val) for c in op.outputs[0].child_ops] == [
                ("matmul", types.fp16, True)]


def test_codes_scales_zero_points_are_the_records(exported):
    """Both functions hold every record as constexpr_blockwise_shift_scale with the records' codes, fp16 scales and
    zero points bit for bit; every LLM Linear is quantised but the layout's kept-float delta-net gate projections,
    and no recorded weight is also stored float."""
    from coremltools.converters.mil.mil import types
    from torch import nn

    _, model, records = quantized()
    assert sum(r.bits == 4 for r in records.values()) > 1 and records["lm_head"].bits == 8
    kept = {f"{prefix}.{name}" for prefix, m in model.named_modules() if prefix.startswith("model.language_model.")
            and hasattr(m, "linear_attn") for name in KEPT_FLOAT["qwen3.5 gated delta-net decoder"]}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)
               and n.startswith(("model.language_model.", "lm_head"))}
    assert kept and set(records) == linears - kept  # what quant/ records is all the package may hold as codes
    program = _program(exported / "llm.mlpackage")
    for name in ("prefill", "decode"):
        function = program.functions[name]
        ops = {op.outputs[0].name: op for op in function.find_ops(op_type="constexpr_blockwise_shift_scale")}
        assert set(ops) == {_op_name(n) for n in records}
        floats = {op.outputs[0].name.removesuffix("_to_fp16") for op in function.find_ops(op_type="const")}
        assert not floats & set(ops) and {_op_name(n) for n in kept} <= floats  # the gate projections stay float
        for record_name, record in records.items():
            op = ops[_op_name(record_name)]
            assert types.builtin_to_string(op.data.dtype) == f"uint{record.bits}"
            assert np.array_equal(op.data.val.astype(np.uint8), record.codes.numpy())
            assert op.scale.val.dtype == np.float16
            assert np.array_equal(op.scale.val.view(np.uint16), record.scales.numpy().view(np.uint16))
            assert np.array_equal(op.offset.val.astype(np.uint8), record.zeros.numpy())


def test_prefill_and_decode_share_one_copy_of_the_weights(exported):
    """Both functions read every weight (float constants and the int4 / int8 ops' codes, scales, zero points) from
    the same blob offsets, and the weight file holds about one copy: the records at their bit widths plus the
    remaining float parameters in fp16 (two copies would be about twice that)."""
    package = exported / "llm.mlpackage"
    spec = ct.utils.load_spec(str(package))

    def blobs(function) -> dict[str, int]:
        out = {}
        for op in function.block_specializations[function.opset].operations:
            for arg, binding in op.inputs.items():  # constexpr ops hold their data, scale and offset inline
                for a in binding.arguments:
                    if a.HasField("value") and a.value.WhichOneof("value") == "blobFileValue":
                        out[f"{op.outputs[0].name}.{arg}"] = a.value.blobFileValue.offset
            if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
                out[op.outputs[0].name] = op.attributes["val"].blobFileValue.offset
        return out

    prefill, decode = ({k: v for k, v in blobs(spec.mlProgram.functions[f]).items() if k.startswith("p_")}
                       for f in ("prefill", "decode"))
    _, model, records = quantized()
    assert prefill and prefill == decode
    assert {f"{_op_name(n)}.{arg}" for n in records for arg in ("data", "scale", "offset")} <= set(prefill)
    quantised = sum(r.codes.numel() * r.bits / 8 + r.scales.numel() * 2 + r.zeros.numel() * r.bits / 8
                    for r in records.values())
    from minicpm.hybrid_step import HybridLanguageModelStep

    recorded = {f"{n}.weight" for n in records}
    floats = 2 * sum(p.numel() for n, p in model.named_parameters() if n.startswith("model.language_model.")
                     and "embed_tokens" not in n and n not in recorded)
    step = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK)
    floats += 2 * sum(b.numel() for n, b in step.named_buffers() if n.startswith("rope"))  # the M-RoPE tables
    size = (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    # two copies would be ~2x; allowed: 10% + 16 KB (64-byte blob alignment, the shape-specific constants)
    assert quantised + floats <= size < 1.1 * (quantised + floats) + 16384


def test_vision_package_io(exported, hybrid):
    from export.onnx_hybrid import vision_facts
    from minicpm.hybrid_vision import HybridVisionStep

    _, model = hybrid(NAME)
    manifest = read_manifest(exported)
    step = manifest["schedule"]["steps"]["vision"]
    patches, hidden = step["max_patches"], model.config.text_config.hidden_size
    assert patches == 1200 and step == vision_facts(HybridVisionStep(model, "16x"), "16x", patches)  # ONNX's layout
    spec = ct.utils.load_spec(str(exported / "vision.mlpackage"))
    assert _tensors(spec.description.input) == {
        "pixel_values": ((1, 3, 14, patches * 14), "FLOAT16"), "position_ids": ((patches,), "INT32"),
        "patch_order": ((patches,), "INT32"), "patch_mask": ((patches,), "FLOAT16")}
    assert _tensors(spec.description.output) == {"features": ((patches // 16, hidden), "FLOAT16")}
    assert not _program(exported / "vision.mlpackage").functions["main"].find_ops(
        op_type="constexpr_blockwise_shift_scale")  # vision weights stay float


def test_manifest_state_and_parity(exported):
    """schedule.state is the step's spec (as ONNX); schedule.coreml.state maps the package states onto it; the
    quantisation entry names the records written; the parity numbers are the converted module's against the torch
    step of the same int4 weights, and the float16 state is what separates them from float32."""
    from export.coreml import COMPRESSION
    from export.coreml_hybrid import CoreMLHybridStep, llm_error
    from minicpm.hybrid_step import HybridLanguageModelStep

    _, model, records = quantized()
    manifest = read_manifest(exported)
    assert manifest["quantization"] == {
        "method": "int4-rtn", "bits": 4, "group_size": GROUP, "symmetric": False, "layers": len(records) - 1,
        "audio_layers": 0, "int8_layers": 1, "lm_head": "int8", "records_from": "this export", **COMPRESSION}
    schedule = manifest["schedule"]
    assert manifest["format"] == "coreml" and manifest["model"]["dtype"] == "float16"
    step = HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).eval()
    assert schedule["state"] == step.spec.to_dict() and schedule["modalities"] == ["text", "image"]
    state = schedule["coreml"]["state"]
    assert state["owner"] == "backend" and state["slack_slots"] == CHUNK
    assert {n: (tuple(t["shape"]), t["dtype"]) for n, t in state["tensors"].items()} == {
        n: (s, "float16") for n, (s, _) in _state_shapes(model).items()}
    assert state["tensors"]["v_cache_1"]["of"] == "past_values[1]" and state["tensors"]["conv_state"]["update"] == \
        "replace"
    assert schedule["steps"]["prefill"] == {"artifact": "llm", "function": "prefill", "tokens": CHUNK}
    parity = manifest["parity"]
    assert parity["vision"] < 1e-4 and parity["llm_fp32_state"] < 1e-4 < parity["llm"] < 2e-2
    wrapper = CoreMLHybridStep(HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).eval(), CHUNK)
    assert llm_error(wrapper, step, CHUNK) == pytest.approx(parity["llm"], abs=1e-6)  # the same measurement


class StandIn:
    """What `ct.models.MLModel` returns, run by the converted torch modules: checks each feed against the
    function's declared inputs (names, shapes, dtypes), and `make_state()` is a fresh stateful module."""

    def __init__(self, modules: dict, manifest: dict, path: str, compute_units=None, function_name=None):
        self.kind, self.modules = Path(path).stem, modules
        entry = manifest["artifacts"][self.kind]
        io = entry["functions"][function_name or entry.get("default_function", "main")]
        self.inputs = {t["name"]: (tuple(t["shape"]), t["dtype"]) for t in io["inputs"]}

    def make_state(self):
        return self.modules["llm"]()

    @torch.no_grad()
    def predict(self, feed: dict, state=None) -> dict:
        assert {k: (v.shape, str(v.dtype)) for k, v in feed.items()} == self.inputs
        args = [torch.from_numpy(feed[n]).float() if feed[n].dtype == np.float16 else torch.from_numpy(feed[n]).long()
                for n in self.inputs]
        if self.kind == "vision":
            return {"features": self.modules["vision"](*args).numpy().astype(np.float16)}
        return {"logits": state(*args).numpy().astype(np.float16)}


def test_coreml_backend_runs_an_image_prompt_like_generate(exported, monkeypatch):
    """The Core ML backend's hybrid path (one slice per vision call, padded prefill calls, the state owned by the
    backend) over the converted modules: greedy tokens of a sliced image prompt equal transformers' generate on the
    model of the same quantisation (int4 RTN, int8 head)."""
    from export.coreml_hybrid import CoreMLHybridStep
    from minicpm.hybrid_step import HybridLanguageModelStep
    from minicpm.hybrid_vision import HybridVisionStep
    from minicpm.v4_6 import prompt_inputs

    ckpt, model, _ = quantized()
    manifest = read_manifest(exported)
    modules = {"vision": HybridVisionStep(model, "16x").eval(),
               "llm": lambda: CoreMLHybridStep(HybridLanguageModelStep(model, MAX_CONTEXT, CHUNK).eval(), CHUNK)}
    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ct.models, "MLModel", lambda *a, **k: StandIn(modules, manifest, *a, **k))
    session = Session(exported, "coreml")
    assert session.backend.owns_state and session.state.state == {}  # the host keeps no copy
    session.chunk = 16  # each prefill call runs the T = 32 function padded by the backend
    image = noise_image(640, 480, seed=1)
    got = session.ask([{"role": "user", "content": [image, "Describe it."]}], SamplingConfig(max_new_tokens=8))
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}]
    inputs = dict(prompt_inputs(ckpt.processor, chat, images=[image]))
    assert got.stats["slices"] == 3 and got.stats["prompt_tokens"] == inputs["input_ids"].shape[1]
    assert got.token_ids == _generate(ckpt, model, inputs, 8) and len(set(got.token_ids)) > 1


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs models on macOS")
def test_coreml_backend_refuses_off_macos(exported):
    with pytest.raises(UserError, match="backend coreml needs macOS 15"):
        Session(exported)


def test_tampered_or_missing_package_is_refused_before_loading(exported, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    with open(copy / "llm.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))

    def never(*args, **kwargs):
        raise AssertionError("a package was loaded")

    monkeypatch.setattr(sys, "platform", "darwin")
    monkeypatch.setattr(ct.models, "MLModel", never)
    with pytest.raises(UserError, match=r"artifact 'llm' \(llm.mlpackage\) does not match its sha256"):
        Session(copy, "coreml")
    shutil.rmtree(copy / "vision.mlpackage")
    with pytest.raises(UserError, match=r"artifact 'vision' is missing \(vision.mlpackage\)"):
        read_manifest(copy, verify=False)


@pytest.mark.parametrize(("argv", "message"), [
    (["--quantize-audio"], r"^--quantize-audio applies to MiniCPM-o exports"),
    (["--quant", "none", "--lm-head", "int8"], r"^--lm-head int8 applies to int4 quantisation, not --quant none"),
    (["--quant", "none", "--group-size", "32"], r"^--group-size applies to int4 quantisation, not --quant none"),
])
def test_bad_combinations_are_one_line_errors(argv, message, tmp_path):
    from export.coreml import main

    with pytest.raises(UserError, match=message) as e:
        main(["--model", NAME, "--out", str(tmp_path / "x"), *argv])
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()
