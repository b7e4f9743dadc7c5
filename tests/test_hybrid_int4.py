"""int4 for MiniCPM-V 4.6 / 4.7 (Qwen3.5 text layers): the AWQ layout covers every Linear of both layer kinds,
folding scales leaves the float model unchanged (and a wrong fold would not), llm.onnx holds the records' codes bit
for bit, and greedy tokens of the int4 ONNX chain equal the eager model of the same quantisation on a text and an
image prompt: AWQ through `python -m quant.awq` on 4.6 (the eager reference is runtime.parity's, on that directory),
RTN at export time with an int8 head on 4.7. The Core AI export of the AWQ directory holds the same codes."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from export.matmul_nbits import _unpack_nibbles, block_size_for
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig
from quant import QuantConfig, rtn_quantize
from quant.layout import HYBRID_LLM_BLOCKS, BlockList, ScaleGroup, known_layout, make_plan
from quant.records import load_records
from quant.scaling import apply_scale
from runtime.manifest import read_manifest
from runtime.parity import eager_reference
from runtime.session import Session
from tests.conftest import noise_image
from tests.export_pool import Quantized

MAX_CONTEXT, NEW = 256, 8
RTN_47 = ("onnx", "tiny-minicpm-v-4.7", "--max-context", str(MAX_CONTEXT), "--quant", "int4-rtn", "--group-size",
          "32", "--lm-head", "int8", "--accuracy-level", "0")
AWQ_46 = Quantized("tiny-minicpm-v-4.6", ("--group-size", "32", "--samples", "4", "--seq-len", "96"))
ONNX_46 = ("onnx", AWQ_46, "--max-context", str(MAX_CONTEXT), "--accuracy-level", "0")
COREAI_46 = ("coreai", AWQ_46, "--max-context", str(MAX_CONTEXT), "--prefill-chunk", "16")
EXPORTS_AHEAD = [RTN_47, ONNX_46, COREAI_46]  # queued at session start
LAYOUTS = {"qwen3.5 gated delta-net decoder", "llama/qwen2/qwen3 decoder"}
TEXT = [{"role": "user", "content": ["Tell me about the weather."]}]
IMAGE = [{"role": "user", "content": [noise_image(200, 150, seed=3), "What is in this image?"]}]


@pytest.fixture(scope="module")
def awq_46(exports):
    """(quantised directory, its ONNX and Core AI exports as callables): tiny 4.6 through `python -m quant.awq`, both
    built on the session's pool, queued at session start."""
    return exports.quantized(AWQ_46), lambda: exports(*ONNX_46), lambda: exports(*COREAI_46)


def test_vision_int4_is_refused_in_one_line(tmp_path):
    from quant.awq import main  # noqa: PLC0415

    with pytest.raises(UserError, match=r"^MiniCPM-V 4.6 / 4.7 calibrate the language model only") as e:
        main(["--model", "tiny-minicpm-v-4.6", "--out", str(tmp_path / "x"), "--quantize-vision"])
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_layout_covers_every_linear(hybrid):
    """Each Qwen3.5 layer kind matches a named layout whose groups hold exactly its Linears; every one of them is
    int4 or kept float with the layout's stated reason (the delta-net gate projections), none by accident."""
    _, model = hybrid("tiny-minicpm-v-4.6")
    plan = make_plan(model, QuantConfig(group_size=32))
    seen = set()
    for prefix, block in BlockList.at(model, HYBRID_LLM_BLOCKS).blocks:
        layout, groups = known_layout(block)
        seen.add(layout)
        linears = {n for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert sorted(n for g in groups for n in g.linears) == sorted(linears)  # each Linear in exactly one group
        for name in linears:
            full = prefix + name
            assert full in plan.int4 or "delta-net gate projection" in plan.kept.get(full, ""), full
    assert seen == LAYOUTS
    kept = [n for n in plan.kept if n.startswith(HYBRID_LLM_BLOCKS)]
    assert sorted(n.rsplit(".", 1)[1] for n in kept) == ["in_proj_a", "in_proj_a", "in_proj_b", "in_proj_b"]


@torch.no_grad()
def test_folding_scales_keeps_the_float_model(hybrid):
    """Random scales folded per the layout (norms of the (1 + weight) form included, an explicit scale on the
    delta-net out_proj) leave the float model's logits unchanged; folding out_proj's scale into in_proj_z instead
    (silu(z) gates it) changes them, so the check can fail."""
    ckpt, base = hybrid("tiny-minicpm-v-4.7")
    inputs = ckpt.prompts.reference_inputs(TEXT)
    reference = base(**inputs).logits
    gen = torch.Generator().manual_seed(0)

    def scale(model: nn.Module, wrong: bool = False) -> set:
        placed = set()
        for _, block in BlockList.at(model, HYBRID_LLM_BLOCKS).blocks:
            layout, groups = known_layout(block)
            for group in groups:
                if wrong and group.linears == ["linear_attn.out_proj"]:
                    group = ScaleGroup(group.linears, "linear_attn.in_proj_z", "linear")
                if group.kind != "none":
                    width = block.get_submodule(group.linears[0]).in_features
                    apply_scale(block, group, torch.rand(width, generator=gen) * 4 + 0.25)
                placed.add((layout, group.prev, group.kind))
        return placed

    model = copy.deepcopy(base)
    placed = scale(model)
    error = float((model(**inputs).logits - reference).abs().max() / reference.abs().max())
    assert error < 1e-4
    assert {kind for _, _, kind in placed} == {"norm", "linear", "explicit", "none"}  # "none": o_proj under GQA
    assert ("qwen3.5 gated delta-net decoder", "input_layernorm", "norm") in placed  # no fallback to explicit
    wrong = copy.deepcopy(base)
    scale(wrong, wrong=True)
    assert float((wrong(**inputs).logits - reference).abs().max() / reference.abs().max()) > 1e-3


def _check_codes(directory, records: dict) -> None:
    """Every record is one MatMulNBits node of llm.onnx whose initializers unpack to the record bit for bit (a group
    wider than onnxruntime's blocks, the int8 head's, repeats its scale and zero point per block)."""
    graph = onnx.load(str(directory / "llm.onnx")).graph
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == len(records)
    for name, record in records.items():
        rows, block = record.shape[0], block_size_for(record.group_size)
        repeat = record.group_size // block
        codes = inits[f"{name}.qweight"]
        codes = _unpack_nibbles(codes, block) if record.bits == 4 else codes
        assert torch.equal(codes.reshape(record.shape), record.codes), name
        assert torch.equal(inits[f"{name}.scales"].reshape(rows, -1).float(),
                           record.scales.float().repeat_interleave(repeat, 1)), name
        zeros = record.zeros.repeat_interleave(repeat, 1)
        if bool((zeros == 1 << (record.bits - 1)).all()):
            assert f"{name}.qzeros" not in inits  # the op's default zero point
        else:
            packed = inits[f"{name}.qzeros"]
            assert torch.equal(_unpack_nibbles(packed, zeros.shape[1]) if record.bits == 4 else packed, zeros), name
        if record.input_scale is None:
            assert f"{name}.input_scale" not in inits
        else:
            assert torch.equal(inits[f"{name}.input_scale"].float(), record.input_scale.float()), name


def _tokens(directory, messages) -> list[int]:
    return Session(directory, "onnxruntime").ask(messages, SamplingConfig(max_new_tokens=NEW)).token_ids


def test_awq_46_codes_and_tokens(awq_46):
    """AWQ (quant.awq) -> export.onnx of that directory: codes bit for bit, parity of llm.onnx against the torch step
    of the same weights, and the chain's greedy tokens equal runtime.parity's eager reference (the directory's
    quantised model) on a text and an image prompt."""
    directory, onnx_export, _ = awq_46
    out = onnx_export()
    records, _ = load_records(directory / "quant_records.safetensors")
    assert any(r.input_scale is not None for r in records.values())  # the delta-net out_proj's explicit scale
    _check_codes(out, records)
    manifest = read_manifest(out)
    assert manifest["quantization"]["method"] == "int4-awq" and manifest["quantization"]["layers"] == len(records)
    assert manifest["parity"]["llm"] < 1e-4
    for messages in (TEXT, IMAGE):
        expected = eager_reference(manifest, messages, SamplingConfig(max_new_tokens=NEW), None, False).token_ids
        assert len(expected) > 0
        assert _tokens(out, messages) == expected


@torch.no_grad()
def test_rtn_47_codes_and_tokens(exports, hybrid):
    """RTN at export time with an int8 head: the records recomputed here (RTN is deterministic) are in llm.onnx bit
    for bit, and the chain's greedy tokens equal transformers' generate on the same RTN model (text and image)."""
    out = exports(*RTN_47)
    ckpt, base = hybrid("tiny-minicpm-v-4.7")
    model = copy.deepcopy(base)
    records = rtn_quantize(model, QuantConfig(group_size=32, lm_head="int8")).records
    assert records["lm_head"].bits == 8
    _check_codes(out, records)
    assert read_manifest(out)["parity"]["llm"] < 1e-4
    for messages in (TEXT, IMAGE):
        inputs = ckpt.prompts.reference_inputs(messages)
        generated = model.generate(**inputs, do_sample=False, max_new_tokens=NEW, eos_token_id=ckpt.stop_ids,
                                   pad_token_id=ckpt.stop_ids[0])
        expected = [t for t in generated[0, inputs["input_ids"].shape[1]:].tolist() if t not in ckpt.stop_ids]
        assert len(expected) > 0
        assert _tokens(out, messages) == expected


def test_awq_46_coreai_asset_holds_the_records(awq_46):
    """Core AI export of the same directory: both functions of llm.aimodel hold every int4 record as ui4 codes,
    scales and zero points bit for bit (stored transposed), and the asset matches the torch step of the same
    weights through the Core AI runtime."""
    from export.coreai_asset import quantized_constants  # noqa: PLC0415 (imports coreai)

    directory, _, coreai_export = awq_46
    out = coreai_export()
    records, _ = load_records(directory / "quant_records.safetensors")
    manifest = read_manifest(out)
    assert manifest["quantization"]["layers"] == len(records) and manifest["parity"]["llm"] < 1e-4
    expected = sorted((r.codes.numpy().tobytes(), r.scales.float().numpy().tobytes(), r.zeros.numpy().tobytes())
                      for r in records.values())
    for function in ("prefill", "decode"):
        stored = sorted((np.ascontiguousarray(c.T, np.uint8).tobytes(), np.ascontiguousarray(s.T, np.float32).tobytes(),
                         np.ascontiguousarray(z.T, np.uint8).tobytes())
                        for c, s, z in quantized_constants(out / "llm.aimodel", function))
        assert stored == expected


def test_tied_head_gets_its_own_int8_record_and_the_table_stays_float(tmp_path):
    """The 4.7-1B ties its head to the embedding table: `--lm-head int8` makes the head a per-row int8 record of the
    table (its own Parameter) while the table, which the host reads as token_embedding.bin, keeps its float values.
    Checked on tiny 4.7 rewritten with tied embeddings (config flag on, lm_head.weight dropped, as such checkpoints
    are stored)."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from export.quantization import quantized_model
    from minicpm.v4_6 import HybridCheckpoint
    from quant.codes import quantize_int8_rows

    source = HybridCheckpoint.open("tiny-minicpm-v-4.7").path
    tied = shutil.copytree(source, tmp_path / "tied")
    config = json.loads((tied / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(config))
    weights = load_file(tied / "model.safetensors")
    del weights["lm_head.weight"]
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    table = weights["model.language_model.embed_tokens.weight"].float()
    model, records, quant = quantized_model(HybridCheckpoint.open(str(tied)), "int4-rtn", 32, lm_head="int8")
    record = records["lm_head"]
    codes, _, _ = quantize_int8_rows(table)
    assert quant.lm_head == "int8" and record.bits == 8 and torch.equal(record.codes, codes.to(torch.uint8))
    assert torch.equal(model.get_input_embeddings().weight, table)  # the host's table: float, untouched
    assert torch.equal(model.lm_head.weight, record.dequantize(torch.float32))
    assert not torch.equal(model.lm_head.weight, table)
