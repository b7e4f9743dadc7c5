"""int4 ONNX export: MatMulNBits nodes hold the quantisation records bit for bit, and the onnxruntime chain
gives the PyTorch quantised model's greedy tokens."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from minicpm.generation import SamplingConfig, generate
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import ROOT, noise_image

MAX_CONTEXT = 512
IMAGE = noise_image(640, 480, 2)  # sliced: overview + 2 slices
PROMPT = "What is in this image?"
MARGIN_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def export(tmp_path_factory, private_cache):
    """export(*flags) -> directory of `python -m export.onnx --max-context 512 *flags`, each run once."""
    from export.onnx import main

    done = {}

    def get(*flags: str):
        if flags not in done:
            out = tmp_path_factory.mktemp("onnx-int4") / "export"
            assert main(["--out", str(out), "--max-context", str(MAX_CONTEXT), *flags]) == 0
            done[flags] = out
        return done[flags]

    return get


@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory, private_cache):
    """tiny o-4.5 through `python -m quant.awq --symmetric` (in process; AWQ on one thread is fastest here)."""
    from quant.awq import main

    out = tmp_path_factory.mktemp("awq") / "o45-awq-sym"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["--model", "tiny-minicpm-o-4.5", "--out", str(out), "--symmetric", "--samples", "4",
                     "--seq-len", "64"]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


RTN_V4 = ("--model", "tiny-minicpm-v-4", "--quant", "int4-rtn", "--lm-head", "int8")  # asymmetric, int8 head


def rtn_reference(name: str):
    """QuantResult of the RTN records export.onnx computes for RTN_V4 (RTN is deterministic)."""
    from minicpm.checkpoint import Checkpoint
    from quant import QuantConfig, rtn_quantize

    ckpt = Checkpoint.open(name)
    model, _ = ckpt.load_model("float32")
    return ckpt, rtn_quantize(model, QuantConfig(group_size=128, lm_head="int8"))


def awq_reference(directory):
    from minicpm.checkpoint import Checkpoint
    from quant.checkpoint import load_quantized

    return Checkpoint.open(directory), load_quantized(directory, "float32")


# ----- reading MatMulNBits back, independently of export/matmul_nbits.py ----------------------------------


def matmul_nbits_nodes(path) -> dict[str, dict]:
    """layer name -> attributes and input arrays of its MatMulNBits node (external data loaded)."""
    model = onnx.load(str(path))
    arrays = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    nodes = {}
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        assert node.domain == "com.microsoft"
        inputs = [*node.input, *[""] * (6 - len(node.input))]
        name = inputs[1].removesuffix(".qweight")
        assert inputs[1] == f"{name}.qweight" and inputs[2] == f"{name}.scales"
        assert inputs[3] in ("", f"{name}.qzeros") and name not in nodes  # one node per layer
        nodes[name] = {"attrs": {a.name: a.i for a in node.attribute}, "B": arrays[inputs[1]],
                       "scales": arrays[inputs[2]], "zero_points": arrays.get(inputs[3])}
    if nodes:
        assert {o.domain: o.version for o in model.opset_import}["com.microsoft"] == 1
    return nodes


def unpack_low_first(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Rows of packed values -> [rows, count]: 4-bit values two per byte, low nibble first."""
    rows = packed.shape[0]
    if bits == 8:
        return packed.reshape(rows, -1)[:, :count]
    return np.stack([packed & 0x0F, packed >> 4], -1).reshape(rows, -1)[:, :count]


def assert_records_written(path, records: dict, accuracy_level: int = 4) -> dict:
    nodes = matmul_nbits_nodes(path)
    assert sorted(nodes) == sorted(records)
    for name, record in records.items():
        node, (n, k) = nodes[name], record.shape
        attrs = node["attrs"]
        block = attrs["block_size"]
        assert (attrs["K"], attrs["N"], attrs["bits"], attrs["accuracy_level"]) == (k, n, record.bits, accuracy_level)
        assert record.group_size % block == 0 and block in (16, 32, 64, 128, 256), name
        repeat, blocks = record.group_size // block, k // block  # int8 rows (group = K) span several blocks
        assert node["B"].dtype == np.uint8 and node["B"].shape == (n, blocks, block * record.bits // 8)
        np.testing.assert_array_equal(unpack_low_first(node["B"], record.bits, k), record.codes.numpy(), name)
        assert node["scales"].dtype == np.float32 and node["scales"].shape == (n, blocks)
        np.testing.assert_array_equal(node["scales"], np.repeat(record.scales.float().numpy(), repeat, 1), name)
        zeros = np.repeat(record.zeros.numpy(), repeat, 1)
        if node["zero_points"] is None:  # omitted: the op's default 2^(bits-1)
            assert (zeros == 1 << (record.bits - 1)).all(), name
        else:
            assert node["zero_points"].shape == (n, -(-blocks * record.bits // 8))  # whole bytes per row
            np.testing.assert_array_equal(unpack_low_first(node["zero_points"], record.bits, blocks), zeros, name)
    return nodes


def test_asymmetric_rtn_export_holds_the_records(export):
    out = export(*RTN_V4)
    _, result = rtn_reference("tiny-minicpm-v-4")
    assert len(result.records) == 15 and result.records["llm.lm_head"].bits == 8
    assert_records_written(out / "llm.onnx", result.records)
    assert not matmul_nbits_nodes(out / "vision.onnx")  # vision stays float
    manifest = read_manifest(out)
    q = manifest["quantization"]
    assert (q["method"], q["bits"], q["group_size"], q["symmetric"], q["layers"], q["int8_layers"], q["lm_head"],
            q["accuracy_level"]) == ("int4-rtn", 4, 128, False, 14, 1, "int8", 4)
    assert manifest["parity"]["vision"] < 1e-4


def test_symmetric_awq_directory_export_holds_its_records(export, awq_dir):
    from quant import load_records

    out = export("--model", str(awq_dir))
    records, config = load_records(awq_dir / "quant_records.safetensors")
    assert config.symmetric and len(records) == 14
    assert_records_written(out / "llm.onnx", records)
    q = read_manifest(out)["quantization"]
    assert (q["method"], q["symmetric"], q["layers"], q["lm_head"], q["records_from"]) == (
        "int4-awq", True, 14, "keep", str(awq_dir))


def test_int4_llm_is_smaller(export):
    out = export(*RTN_V4)
    size = sum(p.stat().st_size for p in out.glob("llm.onnx*"))
    # fp32 tiny V-4 LLM: 7.2 MB; int4 blocks + int8 head: under a quarter of that
    assert size < 1.8e6


def reference_tokens(model, ckpt, messages, sampling) -> tuple[list[int], list[torch.Tensor]]:
    """Eager greedy tokens of the quantised model and the logits each step chose from."""
    logits = []
    hook = model.llm.lm_head.register_forward_hook(lambda _m, _i, out: logits.append(out[0, -1].detach().clone()))
    try:
        result = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
    finally:
        hook.remove()
    return result.token_ids, logits


def divergence(got: list[int], expected: list[int], logits: list[torch.Tensor]) -> tuple[int, float] | None:
    """None when equal, else the step where the tokens part and the reference's top1 - top2 logit margin there
    (inf when one sequence merely stopped early)."""
    if got == expected:
        return None
    pairs = zip(got, expected, strict=False)
    step = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(expected)))
    if step >= len(logits):
        return step, float("inf")
    top = torch.topk(logits[step].double(), 2).values
    return step, float(top[0] - top[1])


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_int4_chain_gives_the_quantized_models_tokens(export, awq_dir, name):
    """accuracy_level 4 (int8 activations) is measured and reported; if it parts from the reference, the same
    records at accuracy_level 0 (float compute) must give the reference's tokens exactly."""
    if name == "tiny-minicpm-v-4":
        flags = RTN_V4
        ckpt, result = rtn_reference(name)
    else:
        flags = ("--model", str(awq_dir))
        ckpt, result = awq_reference(awq_dir)
    sampling = SamplingConfig(max_new_tokens=32)
    messages = [{"role": "user", "content": [IMAGE, PROMPT]}]
    expected, logits = reference_tokens(result.model, ckpt, messages, sampling)
    assert len(expected) == 32
    got = Session(export(*flags), "onnxruntime").ask(messages, sampling).token_ids
    level4 = divergence(got, expected, logits)
    if level4 is None:
        return
    step, margin = level4
    warnings.warn(f"{name} int4 at accuracy_level 4 (int8 activations) parts from the reference at step {step}, "
                  f"where its top1 - top2 logit margin is {margin:.4g}", stacklevel=1)
    # int8 activation rounding moves the tiny models' logits by ~0.1 (the export's parity): only a near-tie may flip
    assert margin < MARGIN_TOLERANCE, f"accuracy_level 4 diverged at step {step} with a clear margin {margin:.3g}"
    exact = Session(export(*flags, "--accuracy-level", "0"), "onnxruntime").ask(messages, sampling).token_ids
    parted = divergence(exact, expected, logits)
    assert parted is None, f"accuracy_level 0 parts from the reference at (step, margin) {parted}"


def test_matmul_nbits_module_runs_bias_input_scale_and_wide_int8_groups(tmp_path):
    """What the tiny LLMs do not have: a Linear bias, an explicit AWQ input scale (a Mul), an odd number of
    zero-point nibbles per row, and an int8 group wider than onnxruntime's largest block (256)."""
    import onnxruntime as ort

    from export import matmul_nbits
    from quant import QuantRecord
    from quant.codes import quantize_groups, quantize_int8_rows
    from quant.scaling import InputScaledLinear

    gen = torch.Generator().manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(96, 512), torch.nn.GELU(), torch.nn.Linear(512, 64, bias=False))
    module.eval().requires_grad_(False)
    q, s, z = quantize_groups(torch.randn(512, 96, generator=gen), 4, 32, symmetric=False)  # 3 groups per row
    records = {"0": QuantRecord(q.to(torch.uint8), s.half(), z.to(torch.uint8), 32, 4, False,
                                input_scale=(torch.rand(96, generator=gen) + 0.5).half())}
    q, s, z = quantize_int8_rows(torch.randn(64, 512, generator=gen))
    records["2"] = QuantRecord(q.to(torch.uint8), s.half(), z.to(torch.uint8), 512, 8, True)
    for name, record in records.items():
        module.get_submodule(name).weight.copy_(record.dequantize())
    InputScaledLinear.convert(module[0], records["0"].input_scale)
    x = torch.randn(1, 5, 96, generator=gen)
    with torch.no_grad():
        expected = module(x)
    matmul_nbits.install(module, records, torch.float32, accuracy_level=0)
    with torch.no_grad():
        assert torch.equal(module(x), expected)  # the eager op computes the quantised model exactly
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), str(path), dynamo=True, opset_version=18, input_names=["x"], verbose=False,
                          custom_translation_table=matmul_nbits.TRANSLATION,
                          dynamic_shapes=({1: torch.export.Dim("tokens", min=1, max=64)},))
    graph = onnx.load(str(path))
    graph.ir_version = 10
    nodes = {n.input[1]: n for n in graph.graph.node if n.op_type == "MatMulNBits"}
    assert sorted(nodes) == ["0.qweight", "2.qweight"]
    assert list(nodes["0.qweight"].input) == ["mul", "0.qweight", "0.scales", "0.qzeros", "", "0.bias"]
    assert {a.name: a.i for a in nodes["2.qweight"].attribute}["block_size"] == 256  # 512-wide int8 rows
    assert len(nodes["2.qweight"].input) == 3  # symmetric: no zero points
    mul = next(n for n in graph.graph.node if n.output[0] == "mul")
    assert mul.op_type == "Mul" and "0.input_scale" in mul.input
    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    for tokens in (5, 1):
        x = torch.randn(1, tokens, 96, generator=gen)
        with torch.no_grad():
            # outputs reach ~400: fp32 summation order moves them by ~1e-4; a wrong code or scale moves them by >= 1
            np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], module(x).numpy(), rtol=1e-5,
                                       atol=1e-3)


def test_quantized_directory_refuses_a_conflicting_method(awq_dir):
    out = awq_dir.parent / "x"
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--model", str(awq_dir), "--out", str(out), "--quant",
                        "int4-rtn"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {awq_dir} is already quantised (int4-awq); drop --quant or pass --quant int4-awq"]
    assert not out.exists()


def test_torch_backend_runs_the_quantized_weights_or_refuses(export, awq_dir):
    """The torch backend loads the manifest's source checkpoint: a quantised directory runs its int4 weights (the
    reference tokens), a float checkpoint quantised during the export is refused rather than run in float."""
    from minicpm.errors import UserError

    with pytest.raises(UserError, match="source .* is a float checkpoint"):
        Session(export(*RTN_V4), "torch")
    ckpt, result = awq_reference(awq_dir)
    messages = [{"role": "user", "content": [IMAGE, PROMPT]}]
    sampling = SamplingConfig(max_new_tokens=16)
    expected, _ = reference_tokens(result.model, ckpt, messages, sampling)
    assert Session(export("--model", str(awq_dir)), "torch").ask(messages, sampling).token_ids == expected


def test_generate_parity_line_compares_the_chain_with_the_eager_int4_model(export, awq_dir, tmp_path):
    """`runtime.generate --parity` (what `make demo` prints): the eager reference runs the export's own int4
    weights; at accuracy level 0 the chain is exact, so the line says the tokens agree and names the count."""
    out = export("--model", str(awq_dir), "--accuracy-level", "0")
    image = tmp_path / "image.png"
    IMAGE.save(image)
    r = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifacts", str(out), "--image", str(image),
                        "--prompt", PROMPT, "--max-new-tokens", "12", "--parity", "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    n = len(result["token_ids"])
    assert result["parity"] == f"parity: onnxruntime chain and eager torch reference agree on all {n} greedy tokens"
    from runtime.parity import parity_line

    assert parity_line("x", [1, 2, 3], [1, 5, 3]) == ("parity: x chain and eager torch reference part at token 1 "
                                                     "of 3 (export [2], eager [5])")
    with pytest.raises(Exception, match="float checkpoint"):
        from runtime.parity import eager_reference

        eager_reference(read_manifest(export(*RTN_V4)), [{"role": "user", "content": "x"}], SamplingConfig(), None,
                        False)


def test_generate_parity_is_refused_before_answering_for_a_float_source(export):
    """An int4 export quantised during the export has no int4 checkpoint to compare with: --parity says so in
    one line before any answer is streamed."""
    r = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifacts", str(export(*RTN_V4)), "--prompt",
                        "Hi", "--max-new-tokens", "4", "--parity"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "is a float checkpoint" in r.stderr


def test_int8_vision_graph_reads_only_int8_weights_and_stays_close_to_the_float_step(export, tiny):
    """`--vision-weights int8`: no float MatMul / Gemm of vision.onnx reads a weight any more (each is MatMulInteger
    over an int8 initializer, per output channel), the manifest says so, and on every slice of a sliced photo the
    graph's features stay close to the float torch step (cosine >= 0.999) while differing from it (it is int8)."""
    from export.bundle import DEFAULT_MAX_PATCHES, vision_example
    from minicpm.split import VisionStep

    out = export(*RTN_V4, "--vision-weights", "int8")
    manifest = read_manifest(out)
    assert manifest["quantization"]["vision"]["op"] == "MatMulInteger" and manifest["parity"]["vision"] > 1e-4
    graph = onnx.load(str(out / "vision.onnx"), load_external_data=False).graph
    weights = {i.name: i for i in graph.initializer}
    float_products = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm")
                      and any(name in weights for name in n.input)]
    assert not float_products
    integer = [n for n in graph.node if n.op_type == "MatMulInteger"]
    _, model = tiny("tiny-minicpm-v-4")
    linears = sum(isinstance(m, torch.nn.Linear) for m in [*model.vpm.modules(), *model.resampler.modules()])
    assert len(integer) >= linears  # the resampler's attention adds its packed in-projection's
    assert all(weights[n.input[1]].data_type == onnx.TensorProto.INT8 for n in integer)
    import onnxruntime as ort  # noqa: PLC0415

    session = ort.InferenceSession(str(out / "vision.onnx"), providers=["CPUExecutionProvider"])
    step = VisionStep(model).eval()
    for inputs in vision_example(model, DEFAULT_MAX_PATCHES):
        got = session.run(None, {k: v.numpy() for k, v in inputs.items()})[0].ravel()
        with torch.no_grad():
            expected = step(*inputs.values()).numpy().ravel()
        cosine = float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected))
        assert int8_floor() <= cosine < 1 - 1e-9, cosine


def int8_floor() -> float:
    """The cosine int8 vision keeps on this CPU: 0.999 where int8 dot products are exact (ARM, x86 with VNNI).
    An x86 CPU without VNNI runs onnxruntime's u8 x s8 MatMulInteger with vpmaddubsw, whose int16 pair sums
    saturate (255 * 127 * 2 > 32767): measured 0.998 on an AVX2-only EPYC, so 0.995 there."""
    import platform  # noqa: PLC0415

    from runtime.bench_machine import cpu_flags  # noqa: PLC0415

    if platform.machine() not in ("x86_64", "AMD64"):
        return 0.999
    return 0.999 if {"avx512_vnni", "avx_vnni"} & cpu_flags() else 0.995


def test_int8_vision_of_a_float16_graph_is_refused_in_one_line(tmp_path):
    from export.onnx import main
    from minicpm.errors import UserError

    with pytest.raises(UserError, match=r"^--vision-weights int8 applies to --dtype fp32 graphs$"):
        main(["--model", "tiny-minicpm-v-4", "--out", str(tmp_path / "x"), "--dtype", "fp16", "--vision-weights",
              "int8"])
    assert not (tmp_path / "x").exists()
