"""Opt-in int4 for MiniCPM-o's Whisper audio encoder (`--quantize-audio`): AWQ over the `apm.layers` blocks on the
built-in speech-like calibration clips, and the records written bit for bit in audio.onnx (MatMulNBits), the Core
ML audio package (constexpr_blockwise_shift_scale), Core AI's audio.aimodel (the same op over ui4) and ExecuTorch's
audio_encoder method (8da4w), each measured
against the torch AudioChunkStep of the same quantised model; the ONNX chain gives that model's greedy tokens;
default exports keep the audio encoder float; the flag is refused in one line where it cannot apply."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.quantization import audio_records, llm_records, quantized_model
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig, generate
from minicpm.split import AudioChunkStep
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import ROOT, speechlike
from tests.export_pool import Quantized
from tests.test_onnx_int4 import assert_records_written, matmul_nbits_nodes

NAME = "tiny-minicpm-o-4.5"
MAX_CONTEXT = 640
# XNNPACK's dynamic int8 activations ("8da4w") round a few values differently from torchao's eager emulation of
# them: the first chunk agrees to ~1e-6, chunks after a flip to ~1e-3 (the LLM's text_decoder likewise).
ET_TOLERANCE = 1e-2
AUDIO_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]


# tiny o-4.5 through `python -m quant.awq --symmetric --quantize-audio --group-size 32` (group 32: the tiny encoder is
# 32 wide), built on the session's export pool and exported from there: both exports queued at session start
AWQ_AUDIO = Quantized(NAME, ("--symmetric", "--quantize-audio", "--group-size", "32", "--samples", "4",
                             "--seq-len", "64"))
ONNX = ("onnx", AWQ_AUDIO, "--max-context", str(MAX_CONTEXT), "--accuracy-level", "0")  # float compute: exact chain
COREAI = ("coreai", AWQ_AUDIO, "--max-context", str(MAX_CONTEXT), "--precision", "fp32")
EXPORTS_AHEAD = [ONNX, COREAI]


@pytest.fixture(scope="module")
def awq_audio_dir(exports):
    return exports.quantized(AWQ_AUDIO)


@pytest.fixture(scope="module")
def onnx_export(exports):
    return lambda: exports(*ONNX)


@pytest.fixture(scope="module")
def quantized(awq_audio_dir):
    """(checkpoint, model with the records' weights installed, written records) of the directory."""
    ckpt = Checkpoint.open(awq_audio_dir)
    model, records, info = quantized_model(ckpt, quantize_audio=None)
    assert info.audio_layers == 12 and info.int4_layers == 26
    return ckpt, model, records


def test_awq_quantizes_the_whisper_blocks(awq_audio_dir):
    import json

    from quant import load_records

    records, config = load_records(awq_audio_dir / "quant_records.safetensors")
    assert config.quantize_audio and config.symmetric and config.group_size == 32
    assert sorted(audio_records(records)) == sorted(f"apm.layers.{i}.{n}" for i in range(2) for n in AUDIO_LINEARS)
    report = json.loads((awq_audio_dir / "quant_config.json").read_text())["report"]
    assert report["blocks"] == ["apm.layers", "llm.model.layers"]
    assert report["layouts"]["apm.layers"] == ["whisper encoder"]
    layers = report["layers"]
    assert layers["apm.layers.0.fc1"]["scale"] == "folded into final_layer_norm"
    assert layers["apm.layers.0.fc2"]["scale"] == "explicit input scale"  # GELU before fc2
    assert records["apm.layers.0.fc2"].input_scale is not None
    assert all(layers[n]["output_error"] < 0.3 for n in audio_records(records))
    # the projection into the LLM stays float
    assert report["kept"]["audio_projection_layer.linear1"] == "outside the transformer blocks"


def test_default_keeps_the_audio_encoder_float(tiny):
    from quant import QuantConfig
    from quant.layout import make_plan

    _, model = tiny(NAME)
    plan = make_plan(model, QuantConfig())
    assert not [n for n in plan.int4 if n.startswith("apm.")]
    assert plan.kept["apm.layers.0.fc1"] == "audio encoder (quantize_audio=False)"
    _, records, info = quantized_model(Checkpoint.open(NAME), "int4-rtn")  # an exporter without --quantize-audio
    assert records and not audio_records(records)
    entry = info.manifest()
    assert entry["audio_layers"] == 0 and entry["layers"] == 14 and "audio encoder float" in info.describe()


def test_coreml_audio_package_holds_the_records(quantized, tmp_path):
    ct = pytest.importorskip("coremltools")
    from coremltools.converters.mil.frontend.milproto.load import load
    from coremltools.converters.mil.mil import types

    import export.coreml as exporter

    _, model, records = quantized
    audio = audio_records(records)
    args = argparse.Namespace(precision="fp16", target="iOS18", compute_units="all")
    path, errors = exporter.export_audio(exporter.import_coremltools(), model, tmp_path, args, {}, audio)
    assert errors["audio_fp32_state"] < 1e-4  # the converted graph against AudioChunkStep of the same weights
    assert errors["audio"] < 5e-4  # fp16 K/V state (the float encoder's: 1.4e-4)
    mlmodel = ct.models.MLModel(str(path), skip_model_load=True)
    spec = mlmodel.get_spec()
    program = load(spec, specification_version=spec.specificationVersion, file_weights_dir=mlmodel.weights_dir)
    ops = {op.outputs[0].name: op
           for op in program.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale")}
    assert set(ops) == {"p_step_" + n.replace(".", "_") + "_weight" for n in audio}
    for name, record in audio.items():
        op = ops["p_step_" + name.replace(".", "_") + "_weight"]
        assert types.builtin_to_string(op.data.dtype) == "uint4"
        assert np.array_equal(op.data.val.astype(np.uint8), record.codes.numpy())
        assert np.array_equal(op.scale.val.view(np.uint16), record.scales.numpy().view(np.uint16))
        assert np.array_equal(op.offset.val.astype(np.uint8), record.zeros.numpy())


def test_coreai_audio_asset_holds_the_records(exports, quantized, awq_audio_dir):
    """A Core AI export of the directory writes the audio records into audio.aimodel bit for bit (ui4 codes, scales,
    zero points, stored transposed as the LLM's) and measures it against AudioChunkStep of the same weights."""
    from export.coreai_asset import quantized_constants

    out = exports(*COREAI)
    manifest = read_manifest(out)
    _, _, records = quantized
    audio = audio_records(records)
    assert manifest["quantization"]["audio_layers"] == len(audio) == 12
    assert manifest["parity"]["audio"] < 1e-4 and manifest["parity"]["llm"] < 1e-4
    expected = sorted((r.codes.numpy().tobytes(), r.scales.float().numpy().tobytes(), r.zeros.numpy().tobytes())
                      for r in audio.values())
    stored = sorted((np.ascontiguousarray(c.T, np.uint8).tobytes(), np.ascontiguousarray(s.T, np.float32).tobytes(),
                     np.ascontiguousarray(z.T, np.uint8).tobytes())
                    for c, s, z in quantized_constants(out / "audio.aimodel", "main"))
    assert stored == expected


def test_executorch_audio_method_matches_the_same_quantisation(awq_audio_dir, tmp_path):
    """The audio_encoder method lowered with the records as 8da4w (XNNPACK), chunk by chunk against AudioChunkStep
    of the same torchao weights (the exporter's own parity function)."""
    import export.executorch as ex
    from export.bundle import audio_example
    from export.executorch_lowering import delegation, lower_each
    from export.executorch_modules import AUDIO_INPUTS, StatefulAudioEncoder, as_tensor
    from export.executorch_parity import audio_parity, load_program

    model, quant, facts = ex.prepare_model(Checkpoint.open(awq_audio_dir))
    assert quant.audio_layers == 12 and facts["scheme"] == "8da4w"
    middle = audio_example(model)[1]
    methods = {"audio_encoder": ex.Method(StatefulAudioEncoder(model).eval(),
                                          tuple(as_tensor(middle[n].numpy()) for n in AUDIO_INPUTS))}
    program, edge = lower_each(ex.export_methods(methods), "xnnpack", {}, torch.float32)
    delegated = delegation(edge, "XnnpackBackend")["audio_encoder"]
    assert delegated["linear_delegated"] == delegated["linear_ops"] == 14  # 12 int4 + the float projection's 2
    path = tmp_path / "audio.pte"
    path.write_bytes(program.buffer)
    error = audio_parity(load_program(path).load_method("audio_encoder"), model)
    print(f"ExecuTorch 8da4w audio_encoder parity {error:.3g}")
    assert error < ET_TOLERANCE, error



def test_bad_flags_are_one_line_errors(awq_audio_dir, tmp_path):
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--model", "tiny-minicpm-v-4", "--out",
                        str(tmp_path / "x"), "--quantize-audio"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 2 and not (tmp_path / "x").exists()
    assert r.stderr.strip().splitlines() == [
        "error: --quantize-audio: minicpm-v-4 has no audio encoder (MiniCPM-o only)"]
    with pytest.raises(UserError, match=r"^--quantize-audio applies to int4 quantisation, not --quant none$"):
        quantized_model(Checkpoint.open(NAME), "none", quantize_audio=True)
    from quant.awq import main

    with pytest.raises(UserError, match=r"^--quantize-audio: tiny-minicpm-v-4 has no audio encoder"):
        main(["--model", "tiny-minicpm-v-4", "--out", str(tmp_path / "y"), "--quantize-audio", "--method", "rtn"])
    rtn = tmp_path / "rtn"  # a quantised directory without audio records
    assert main(["--model", NAME, "--out", str(rtn), "--method", "rtn", "--group-size", "32"]) == 0
    with pytest.raises(UserError, match="holds no audio encoder records: quantise it with python -m quant.awq "
                                        "--quantize-audio"):
        quantized_model(Checkpoint.open(rtn), quantize_audio=True)
    _, records, info = quantized_model(Checkpoint.open(rtn), quantize_audio=None)  # its own records: no audio
    assert records and info.audio_layers == 0
    # a directory's audio records are dropped to float only when an exporter says quantize_audio=False
    _, records, info = quantized_model(Checkpoint.open(awq_audio_dir))
    assert not audio_records(records) and info.notes and "kept as float weights" in info.notes[0]


def test_onnx_audio_graph_holds_the_records(onnx_export, quantized, awq_audio_dir):
    from quant import load_records

    out = onnx_export()
    stored, _ = load_records(awq_audio_dir / "quant_records.safetensors")  # bit for bit as written by quant.awq
    assert_records_written(out / "audio.onnx", audio_records(stored), accuracy_level=0)
    assert_records_written(out / "llm.onnx", llm_records(stored), accuracy_level=0)
    assert not matmul_nbits_nodes(out / "vision.onnx")
    manifest = read_manifest(out)
    q = manifest["quantization"]
    assert (q["layers"], q["audio_layers"], q["audio_accuracy_level"], q["records_from"]) == (
        26, 12, 0, str(awq_audio_dir))
    assert manifest["parity"]["audio"] < 1e-4
    assert "26 int4 layers (12 in the audio encoder)" in (out / "summary.txt").read_text()


def test_onnx_chain_gives_the_same_quantisation_tokens(onnx_export, quantized, tmp_path):
    import soundfile as sf

    ckpt, model, _ = quantized
    path = tmp_path / "clip.wav"
    sf.write(path, speechlike(2.2, seed=7), 16000)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(path)}, "What did you hear?"]}]
    sampling = SamplingConfig(max_new_tokens=12)
    expected = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids
    got = Session(onnx_export(), "onnxruntime").ask(messages, sampling)
    assert got.token_ids == expected and got.stats["audio_chunks"] == 3
    # ... and the int4 encoder is what ran: the float encoder's tokens for this clip differ
    step = AudioChunkStep(model).eval()
    float_model = Checkpoint.open(NAME).load_model("float32")[0]
    from export.bundle import audio_example

    chunk = audio_example(model)[0]
    with torch.no_grad():
        assert not torch.allclose(step(**chunk)[0], AudioChunkStep(float_model).eval()(**chunk)[0], atol=1e-3)
