"""Core ML export: the exact torch modules handed to the converter against the eager reference (full chunked
schedule), the converted packages' structure (functions, I/O, states), the int4 codes read back bit for bit,
weight sharing between prefill and decode, the manifest, and (macOS only) the whole chain through `predict`.

Linux cannot run Core ML models, so numerics are tested on the modules that are converted, and the converted
programs are checked structurally (see REFERENCE section 7)."""

from __future__ import annotations

import copy
import functools
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig, generate
from runtime.audio_chunks import AudioChunker, AudioStepSpec
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import noise_image, speechlike

ct = pytest.importorskip("coremltools")

MODELS = ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"]
MAX_CONTEXT, CHUNK = 640, 32
IMAGES = [noise_image(200, 150, 1), noise_image(640, 480, 2), noise_image(300, 900, 3)]  # last two are sliced
PROMPTS = ["What is in this image?", "Describe the colours."]
CASES = [(IMAGES[0], PROMPTS[0]), (IMAGES[1], PROMPTS[1]), (IMAGES[2], PROMPTS[0])]


@dataclass
class Export:
    """One export run: its directory, and what the exporter handed to the converter."""

    out: Path
    records: dict = field(default_factory=dict)
    vision: torch.nn.Module | None = None
    llm: torch.nn.Module | None = None
    llm_tokens: list[int] = field(default_factory=list)
    audio: torch.nn.Module | None = None  # MiniCPM-o: the stateful audio encoder


@pytest.fixture(scope="module")
def exported(tmp_path_factory, private_cache):
    """name -> Export (each tiny model exported once per module, int4 RTN: AWQ's search takes minutes here).
    The o-4.5 export takes --ane-vision, so both vision variants are covered."""
    import export.coreml as exporter

    done = {}

    def get(name: str) -> Export:
        if name in done:
            return done[name]
        run = Export(tmp_path_factory.mktemp("coreml") / name)
        open_weights, export_program = exporter.open_weights, exporter.export_program

        def capture_weights(*args, **kwargs):
            weights = open_weights(*args, **kwargs)
            run.records = weights.records  # filled part by part as the export reads them
            return weights

        def capture_export(module, args):
            # a copy: the streamed export releases each part's weights once its package is written
            if isinstance(module, exporter.StatefulLanguageModel):
                run.llm = run.llm or copy.deepcopy(module)
                run.llm_tokens.append(args[0].shape[1])
            elif isinstance(module, exporter.StatefulAudioEncoder):
                run.audio = copy.deepcopy(module)
            else:
                run.vision = copy.deepcopy(module)
            return export_program(module, args)

        argv = ["--model", name, "--out", str(run.out), "--quant", "int4-rtn", "--max-context", str(MAX_CONTEXT),
                "--prefill-chunk", str(CHUNK)]
        if name == "tiny-minicpm-o-4.5":
            argv.append("--ane-vision")
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(exporter, "open_weights", capture_weights)
            mp.setattr(exporter, "export_program", capture_export)
            assert exporter.main(argv) == 0
        done[name] = run
        return run

    return get


@functools.cache
def quantized_reference(name: str):
    """The eager reference: the checkpoint with the same (deterministic) int4 RTN weights installed."""
    from export.coreml_weights import prepare_model

    ckpt = Checkpoint.open(name)
    model, records, _ = prepare_model(ckpt, "int4-rtn")
    return ckpt, model, records


class TorchStatefulBackend:
    """The captured converter modules behind the Session, exactly as the Core ML backend drives the packages:
    vision one slice per call, the LLM only at T = chunk (prefill) or T = 1 (decode), cache inside the module."""

    name = "torch-stateful"
    owns_cache = True
    owns_audio_cache = True  # MiniCPM-o: the audio encoder's cache is the module's state, one chunk per call

    def __init__(self, vision: torch.nn.Module, llm: torch.nn.Module, tokens: list[int],
                 audio: torch.nn.Module | None = None):
        self.vision_step, self.llm_step, self.tokens, self.audio_step = vision, llm, set(tokens), audio

    def reset(self) -> None:
        self.llm_step.reset()
        if self.audio_step is not None:
            self.audio_step.reset()

    @torch.no_grad()
    def vision(self, **inputs: np.ndarray) -> np.ndarray:
        rows = []
        for i in range(len(inputs["pixel_values"])):
            feed = {k: torch.from_numpy(np.ascontiguousarray(v[i:i + 1])) for k, v in inputs.items()}
            feed = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}
            rows.append(self.vision_step(**feed).numpy())
        return np.concatenate(rows)

    @torch.no_grad()
    def llm(self, **inputs: np.ndarray):
        assert inputs["inputs_embeds"].shape[1] in self.tokens
        feed = {k: torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in
                ("inputs_embeds", "position_ids", "attention_mask", "last_index")}
        feed = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}
        return self.llm_step(**feed).numpy(), None, None

    @torch.no_grad()
    def audio(self, **inputs: np.ndarray):
        assert inputs["past_keys"].shape == inputs["past_values"].shape == (0,)  # the cache is the state
        feed = {k: torch.from_numpy(np.ascontiguousarray(inputs[k])) for k in AUDIO_INPUTS}
        feed = {k: v.float() if v.is_floating_point() else v for k, v in feed.items()}
        return self.audio_step(**feed).numpy(), None, None


AUDIO_INPUTS = ("mel", "conv_mask", "position_ids", "attention_mask")


def stateful_session(run: Export) -> Session:
    # the Core ML export's manifest, tokenizer and embedding table, with the converter's modules as the backend
    return Session(run.out, TorchStatefulBackend(run.vision, run.llm, run.llm_tokens, run.audio))


# ----- (a) the converter's torch modules against the eager reference -------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_converter_modules_reproduce_eager_greedy_tokens(exported, name):
    run = exported(name)
    assert sorted(run.llm_tokens) == [1, CHUNK]  # the same module exported as decode and prefill
    ckpt, model, records = quantized_reference(name)
    assert set(records) == set(run.records)
    session = stateful_session(run)
    sampling = SamplingConfig(max_new_tokens=16)
    for img, text in CASES:
        messages = [{"role": "user", "content": [img, text]}]
        reference = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
        session.reset()
        got = session.ask(messages, sampling)
        assert got.stats["prompt_tokens"] > 2 * CHUNK  # several prefill chunks, the last one padded
        assert got.token_ids == reference.token_ids, (name, img.size, text)
        assert got.text == reference.text


@pytest.mark.parametrize("name", MODELS)
def test_converter_module_parity_includes_the_slack(exported, name):
    """Logits over the exporter's schedule (full chunk, decode steps, a last chunk whose pad rows run into the
    slack slots) against LanguageModelStep with a host-held float32 cache; also the number in the manifest."""
    from export.coreml import reference_logits, wrapper_error

    run = exported(name)
    _, model, _ = quantized_reference(name)
    error = wrapper_error(run.llm, model.config.hidden_size, reference_logits(model, MAX_CONTEXT, CHUNK))
    assert error < 2e-2  # fp16 KV state vs a float32 cache
    manifest = read_manifest(run.out)
    assert manifest["parity"]["llm"] == pytest.approx(error, abs=1e-6)
    assert manifest["parity"]["vision"] < 1e-4


def test_two_turn_conversation_reuses_the_state(exported):
    """A follow-up turn writes after the first turn's slots (no reset), as the shared make_state() does."""
    from minicpm.prompt import Prompt

    run = exported("tiny-minicpm-v-4")
    ckpt, model, _ = quantized_reference("tiny-minicpm-v-4")
    session = stateful_session(run)
    sampling = SamplingConfig(max_new_tokens=12)
    first = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    second = [{"role": "user", "content": [IMAGES[0], "Tell me more."]}]
    a1 = session.ask(first, sampling)
    a2 = session.ask(second, sampling)
    t1, t2 = ckpt.prompts.build(first), ckpt.prompts.build_turn(second, first_image=1)
    offset = len(t1.input_ids) + len(a1.token_ids)
    whole = Prompt(t1.input_ids + a1.token_ids + t2.input_ids,
                   t1.image_bounds + [(s + offset, e + offset) for s, e in t2.image_bounds], t1.images + t2.images)
    assert a2.token_ids == generate(model, whole, ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids


# ----- (b) package structure -------------------------------------------------------------------------------


def _tensors(features, kind: str = "multiArrayType") -> dict[str, tuple[list[int], str]]:
    from coremltools.proto import FeatureTypes_pb2

    names = {v: k for k, v in FeatureTypes_pb2.ArrayFeatureType.ArrayDataType.items()}
    out = {}
    for f in features:
        array = f.type.stateType.arrayType if kind == "state" else f.type.multiArrayType
        out[f.name] = (tuple(int(d) for d in array.shape), names[array.dataType])
    return out


def _program(path: Path):
    """The MIL program of a saved package, weights read back from its blob file."""
    from coremltools.converters.mil.frontend.milproto.load import load

    model = ct.models.MLModel(str(path), skip_model_load=True)
    spec = model.get_spec()
    return load(spec, specification_version=spec.specificationVersion, file_weights_dir=model.weights_dir)


@pytest.mark.parametrize("name", MODELS)
def test_llm_package_functions_io_and_states(exported, tiny, name):
    run = exported(name)
    _, model = tiny(name)
    cfg = model.config.llm
    hidden, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    head_dim = getattr(cfg, "head_dim", None) or hidden // cfg.num_attention_heads
    spec = ct.utils.load_spec(str(run.out / "llm.mlpackage"))
    assert spec.specificationVersion >= 9  # iOS 18: states and constexpr_blockwise_shift_scale
    desc = spec.description
    assert [f.name for f in desc.functions] == ["prefill", "decode"] and desc.defaultFunctionName == "decode"
    slots = MAX_CONTEXT + CHUNK
    for function, tokens in zip(desc.functions, (CHUNK, 1), strict=True):
        assert _tensors(function.input) == {
            "inputs_embeds": ((1, tokens, hidden), "FLOAT16"), "position_ids": ((1, tokens), "INT32"),
            "attention_mask": ((1, 1, tokens, MAX_CONTEXT + tokens), "FLOAT16"), "last_index": ((1,), "INT32")}
        assert list(_tensors(function.input)) == ["inputs_embeds", "position_ids", "attention_mask", "last_index"]
        assert _tensors(function.output) == {"logits": ((1, vocab), "FLOAT16")}
        states = _tensors(function.state, "state")
        assert list(states) == [f"{kind}_cache_{i}" for i in range(layers) for kind in "kv"]
        assert set(states.values()) == {((1, cfg.num_key_value_heads, slots, head_dim), "FLOAT16")}
    meta = desc.metadata
    assert meta.author.startswith("minicpm-mobile") and "prefill" in meta.shortDescription
    assert meta.userDefined["quantization"] == "int4-rtn" and meta.userDefined["state_slots"] == str(slots)

    program = _program(run.out / "llm.mlpackage")
    for fname in ("prefill", "decode"):
        function = program.functions[fname]
        ops = [op.op_type for op in function.operations]
        # every state read once, written once through a slice_update at the dynamic slot
        assert ops.count("read_state") == ops.count("coreml_update_state") == 2 * layers
        assert ops.count("slice_update") >= 2 * layers + 1  # + the mask columns moved onto the slots
        assert "scatter" not in ops and "scatter_nd" not in ops
        # RMSNorm variance in float32 inside the fp16 program: input, post-attention, final (+ q/k norms, Qwen3)
        norms = 2 * layers + 1 + (2 * layers if hasattr(model.llm.model.layers[0].self_attn, "q_norm") else 0)
        means = [op for op in function.find_ops(op_type="reduce_mean")]
        assert len(means) == norms and all(op.outputs[0].dtype == ct.converters.mil.mil.types.fp32 for op in means)
        assert all(op.outputs[0].dtype == ct.converters.mil.mil.types.fp16
                   for op in function.find_ops(op_type="matmul"))
        # GQA reads each KV head in place: no op materialises the cache once per query head
        heads = cfg.num_attention_heads
        assert heads > cfg.num_key_value_heads
        per_query_head = {(1, heads, slots, head_dim), (1, heads, head_dim, slots)}
        assert not [op.op_type for op in function.operations for out in op.outputs
                    if tuple(getattr(out, "shape", ())) in per_query_head]


@pytest.mark.parametrize("name", MODELS)
def test_vision_package_io(exported, tiny, name):
    run = exported(name)
    _, model = tiny(name)
    manifest = read_manifest(run.out)
    patches, p, hidden = manifest["preprocessing"]["max_patches"], 14, model.config.hidden_size
    spec = ct.utils.load_spec(str(run.out / "vision.mlpackage"))
    assert _tensors(spec.description.input) == {
        "pixel_values": ((1, 3, p, patches * p), "FLOAT16"), "position_ids": ((1, patches), "INT32"),
        "patch_mask": ((1, patches), "FLOAT16"), "pos_embed": ((1, patches, hidden), "FLOAT16")}
    assert _tensors(spec.description.output) == {"features": ((1, model.config.query_num, hidden), "FLOAT16")}
    ane = name == "tiny-minicpm-o-4.5"
    assert spec.description.metadata.userDefined["ane_variant"] == str(ane).lower()
    assert manifest["schedule"]["coreml"]["compute_units"]["vision"] == ("cpu_and_ne" if ane else "all")
    # vision weights stay float: nothing quantised, fp16 constants
    program = _program(run.out / "vision.mlpackage")
    assert not program.functions["main"].find_ops(op_type="constexpr_blockwise_shift_scale")


# ----- (c) int4 codes bit for bit, (d) weights shared --------------------------------------------------------


def _op_name(record_name: str) -> str:
    """Record `llm.model.layers.0.mlp.up_proj` -> the converted weight `p_step_layers_0_mlp_up_proj_weight`."""
    fqn = record_name.replace("llm.model.", "step.").replace("llm.lm_head", "step.lm_head")
    return "p_" + fqn.replace(".", "_") + "_weight"


@pytest.mark.parametrize("name", MODELS)
def test_codes_scales_zero_points_are_the_records(exported, name):
    from coremltools.converters.mil.mil import types

    run = exported(name)
    program = _program(run.out / "llm.mlpackage")
    assert any(r.bits == 4 for r in run.records.values()) and run.records["llm.lm_head"].bits == 8
    # the export streamed the checkpoint (each Linear quantised alone): the same records as the whole-model load
    _, _, loaded = quantized_reference(name)
    llm_records = {n: r for n, r in loaded.items() if not n.startswith("apm.")}
    assert set(run.records) == set(llm_records)
    for record_name, record in llm_records.items():
        streamed = run.records[record_name]
        assert torch.equal(streamed.codes, record.codes) and torch.equal(streamed.zeros, record.zeros)
        assert torch.equal(streamed.scales, record.scales)
    for fname in ("prefill", "decode"):
        ops = {op.outputs[0].name: op for op in
               program.functions[fname].find_ops(op_type="constexpr_blockwise_shift_scale")}
        assert set(ops) == {_op_name(n) for n in run.records}
        for record_name, record in run.records.items():
            op = ops[_op_name(record_name)]
            assert types.builtin_to_string(op.data.dtype) == f"uint{record.bits}"
            assert np.array_equal(op.data.val.astype(np.uint8), record.codes.numpy())
            assert op.scale.val.dtype == np.float16
            assert np.array_equal(op.scale.val.view(np.uint16), record.scales.numpy().view(np.uint16))
            assert np.array_equal(op.offset.val.astype(np.uint8), record.zeros.numpy())


@pytest.mark.parametrize("name", MODELS)
def test_prefill_and_decode_share_one_copy_of_the_weights(exported, name):
    run = exported(name)
    package = run.out / "llm.mlpackage"
    spec = ct.utils.load_spec(str(package))

    def blobs(function) -> dict[str, int]:
        """Blob offsets of the weights (parameters p_*, buffers b_*; other constants are shape-specific)."""
        out = {}
        for op in function.block_specializations[function.opset].operations:
            for arg, binding in op.inputs.items():
                for a in binding.arguments:
                    if a.HasField("value") and a.value.WhichOneof("value") == "blobFileValue":
                        out[f"{op.outputs[0].name}.{arg}"] = a.value.blobFileValue.offset
            if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue":
                out[op.outputs[0].name] = op.attributes["val"].blobFileValue.offset
        return out

    prefill, decode = ({k: v for k, v in blobs(spec.mlProgram.functions[f]).items() if k.startswith(("p_", "b_"))}
                       for f in ("prefill", "decode"))
    assert prefill and prefill == decode  # every weight of both functions points at the same bytes
    # ... and the weight file holds about one copy: int4 codes and zeros at 4 bits, int8 head at 8, fp16 scales
    # and float constants (norms, rope tables) at 2 bytes; 64-byte blob alignment is the rest.
    one_copy = sum(r.codes.numel() * r.bits / 8 + r.scales.numel() * 2 + r.zeros.numel() * r.bits / 8
                   for r in run.records.values())
    floats = sum(b.numel() for n, b in run.llm.named_buffers() if n.startswith("step.rope")) * 2
    floats += sum(p.numel() for n, p in run.llm.named_parameters() if "norm" in n) * 2
    size = (package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").stat().st_size
    # two copies would be ~2x; allowed: 2% + 16 KB (blob alignment, the shape-specific mask-fill constants)
    assert one_copy + floats <= size < 1.02 * (one_copy + floats) + 16384


# ----- manifest and runtime ---------------------------------------------------------------------------------


def test_manifest_describes_the_schedule(exported):
    run = exported("tiny-minicpm-v-4")
    manifest = read_manifest(run.out)  # verifies every hash, packages as directory trees
    assert manifest["format"] == "coreml" and manifest["model"]["dtype"] == "float16"
    steps = manifest["schedule"]["steps"]
    assert steps["prefill"] == {"artifact": "llm", "function": "prefill", "tokens": CHUNK}
    assert steps["decode"] == {"artifact": "llm", "function": "decode", "tokens": 1}
    coreml = manifest["schedule"]["coreml"]
    assert coreml["state"]["slots"] == MAX_CONTEXT + CHUNK and len(coreml["state"]["names"]) == 4
    assert manifest["quantization"]["method"] == "int4-rtn" and manifest["quantization"]["lm_head"] == "int8"
    assert manifest["artifacts"]["token_embedding"]["dtype"] == "float16"
    assert set(manifest["artifacts"]["llm"]["functions"]) == {"prefill", "decode"}


def test_tampered_package_is_refused(exported, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exported("tiny-minicpm-v-4").out, copy)
    weights = copy / "llm.mlpackage" / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    with open(weights, "r+b") as f:
        f.seek(100)
        f.write(b"\x01\x02\x03")
    with pytest.raises(UserError, match=r"'llm' \(llm.mlpackage\) does not match its sha256"):
        read_manifest(copy)
    shutil.rmtree(copy / "vision.mlpackage")
    with pytest.raises(UserError, match=r"artifact 'vision' is missing \(vision.mlpackage\)"):
        read_manifest(copy, verify=False)


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML runs models on macOS")
def test_coreml_backend_refuses_off_macos(exported):
    with pytest.raises(UserError, match="backend coreml needs macOS 15"):
        Session(exported("tiny-minicpm-v-4").out, "coreml")
    with pytest.raises(UserError, match="backend coreml needs macOS 15"):  # the default for a Core ML export
        Session(exported("tiny-minicpm-v-4").out)


@pytest.mark.parametrize("argv, message", [
    (["--precision", "fp32", "--ane-vision"], "--ane-vision needs --precision fp16"),
    (["--group-size", "48"], "--group-size must be 32, 64 or 128"),
    (["--quant", "none", "--group-size", "32"], "--group-size applies to int4"),
    (["--prefill-chunk", "64", "--max-context", "64"], "must exceed --prefill-chunk"),
])
def test_bad_arguments_are_one_line_errors(argv, message, tmp_path):
    from export.coreml import main

    with pytest.raises(UserError, match=message):
        main(["--model", "tiny-minicpm-v-4", "--out", str(tmp_path / "x"), *argv])


def test_quantised_checkpoint_brings_its_records(tmp_path, private_cache):
    """`python -m quant.awq` output is exported with its own records (here RTN for speed), not re-quantised."""
    from export.coreml_weights import prepare_model
    from quant.awq import main as quantize
    from quant.records import load_records

    out = tmp_path / "q"
    assert quantize(["--model", "tiny-minicpm-v-4", "--out", str(out), "--method", "rtn", "--lm-head", "int8"]) == 0
    model, records, info = prepare_model(Checkpoint.open(str(out)), None)
    saved, _ = load_records(out / "quant_records.safetensors")
    assert info.method == "int4-rtn" and info.source == str(out) and set(records) == set(saved)
    for name, record in saved.items():
        assert torch.equal(records[name].codes, record.codes) and torch.equal(records[name].scales, record.scales)
    with pytest.raises(UserError, match="already quantised"):
        prepare_model(Checkpoint.open(str(out)), "int4-awq")


def test_quant_none_lm_head_choice_and_record_checks(private_cache):
    from export.coreml_weights import BlockwiseLinear, install_records, prepare_model

    ckpt = Checkpoint.open("tiny-minicpm-v-4")
    model, records, info = prepare_model(ckpt, "none")
    assert records == {} and info.method == "none" and info.lm_head == "keep"
    embed = model.llm.model.embed_tokens.weight.clone()
    model, records, info = prepare_model(ckpt, "none", lm_head="int8")
    assert list(records) == ["llm.lm_head"] and records["llm.lm_head"].bits == 8 and info.lm_head == "int8"
    assert torch.equal(model.llm.model.embed_tokens.weight, embed)  # the host's table keeps float values
    head = model.llm.lm_head.weight.detach().clone()
    with torch.no_grad():
        model.llm.lm_head.weight[0, 0] += 1e-3  # a weight that is not (codes - zeros) * scales any more
    with pytest.raises(UserError, match="llm.lm_head does not match the model's weight"):
        install_records(model, records, half=True)
    with torch.no_grad():
        model.llm.lm_head.weight.copy_(head)
    install_records(model, records, half=True)
    installed = model.llm.lm_head
    assert isinstance(installed, BlockwiseLinear) and installed.bits == 8 and installed.half
    assert torch.equal(installed.weight, head)  # the op dequantises exactly as the record
    with pytest.raises(UserError, match="is a BlockwiseLinear"):  # installed once only
        install_records(model, records, half=True)


# ----- (e) MiniCPM-o audio: one 1 s chunk per call, the encoder cache as state -------------------------------

AUDIO = "tiny-minicpm-o-4.5"


def _audio_dims(model) -> tuple[int, int, int, int, int, int]:
    """layers, heads, head_dim, chunk (encoder frames), pool, positions of the model's audio step."""
    attn = model.apm.layers[0].self_attn
    return (len(model.apm.layers), attn.num_heads, attn.head_dim, model.config.audio_chunk_frames,
            model.config.audio_pool_step, model.apm.max_source_positions)


def test_audio_package_io_and_states(exported, tiny):
    run = exported(AUDIO)
    _, model = tiny(AUDIO)
    layers, heads, head_dim, chunk, pool, positions = _audio_dims(model)
    spec = ct.utils.load_spec(str(run.out / "audio.mlpackage"))
    assert spec.specificationVersion >= 9  # iOS 18: states
    desc = spec.description
    assert len(desc.functions) == 0  # a single-function package (main)
    inputs = _tensors(desc.input)
    assert list(inputs) == list(AUDIO_INPUTS)
    assert inputs == {"mel": ((1, model.apm.num_mel_bins, 2 * chunk + 3), "FLOAT16"),
                      "conv_mask": ((1, 2 * chunk + 1), "FLOAT16"), "position_ids": ((chunk,), "INT32"),
                      "attention_mask": ((1, 1, chunk, positions + chunk), "FLOAT16")}
    assert _tensors(desc.output) == {"tokens": ((chunk // pool, model.config.hidden_size), "FLOAT16")}
    states = _tensors(desc.state, "state")
    assert list(states) == [f"{kind}_cache_{i}" for i in range(layers) for kind in "kv"]
    assert set(states.values()) == {((1, heads, positions, head_dim), "FLOAT16")}
    assert desc.metadata.userDefined["state_slots"] == str(positions)
    function = _program(run.out / "audio.mlpackage").functions["main"]
    ops = [op.op_type for op in function.operations]
    # every state read once, written once through a slice_update at the dynamic slot (+ the mask's columns)
    assert ops.count("read_state") == ops.count("coreml_update_state") == 2 * layers
    assert ops.count("slice_update") == 2 * layers + 1
    assert "scatter" not in ops and "scatter_nd" not in ops
    assert "constexpr_blockwise_shift_scale" not in ops  # the audio encoder stays float
    assert all(op.outputs[0].dtype == ct.converters.mil.mil.types.fp16 for op in function.find_ops(op_type="matmul"))


def test_audio_manifest_entries_and_parity(exported, tiny):
    from export.bundle import audio_example
    from export.coreml import chunks_error
    from minicpm.split import AudioChunkStep

    run = exported(AUDIO)
    _, model = tiny(AUDIO)
    layers, heads, head_dim, chunk, pool, positions = _audio_dims(model)
    manifest = read_manifest(run.out)
    schedule, names = manifest["schedule"], [f"{kind}_cache_{i}" for i in range(layers) for kind in "kv"]
    assert schedule["steps"]["audio"] == {"artifact": "audio", "function": "main", "frames": chunk,
                                          "tokens": chunk // pool, "pool": pool}
    assert schedule["audio_cache"]["shape"] == [layers, heads, positions, head_dim]
    assert manifest["preprocessing"]["audio"]["n_mels"] == model.apm.num_mel_bins
    artifact = manifest["artifacts"]["audio"]
    assert artifact["path"] == "audio.mlpackage" and [t["name"] for t in artifact["inputs"]] == list(AUDIO_INPUTS)
    assert artifact["functions"]["main"]["states"] == [
        {"name": n, "shape": [1, heads, positions, head_dim], "dtype": "float16"} for n in names]
    state = schedule["coreml"]["audio_state"]
    assert state["names"] == names and state["shape"] == [1, heads, positions, head_dim]
    assert state["slots"] == positions and schedule["coreml"]["compute_units"]["audio"] == "all"
    # the manifest's number is the converted graph's (float16 state) over the three example chunks in order
    step = AudioChunkStep(model).eval()
    examples = audio_example(model)
    with torch.no_grad():
        expected = [step(**e)[0] for e in examples]
    run.audio.reset()
    assert chunks_error(run.audio, examples, expected) == pytest.approx(manifest["parity"]["audio"], abs=1e-7)
    run.audio.reset()
    assert manifest["parity"]["audio"] < 1e-3  # float16 state (Core ML's only state dtype) vs a float32 cache
    assert manifest["parity"]["audio_fp32_state"] < 1e-5  # the same graph with float32 state


def _encode_clips(module: torch.nn.Module, spec: AudioStepSpec, clips: list[torch.Tensor]) -> list[np.ndarray]:
    """Each clip through its own AudioChunker (owns_audio_cache), all on the module's one state (no reset)."""
    backend = TorchStatefulBackend(None, None, [], module)
    return [AudioChunker(spec, np.float32, owns_cache=True).encode(c.numpy(), True, backend.audio) for c in clips]


def test_audio_state_through_the_chunker_equals_encode_audio(exported, tiny):
    """A 2.3 s clip chunk by chunk on the converter's module equals the eager whole-clip encoding; a second,
    shorter clip on the same state (no reset) gets its own tokens: the first clip's slots are masked exactly."""
    from export.coreml import StatefulAudioEncoder

    run = exported(AUDIO)
    _, model = tiny(AUDIO)
    spec = AudioStepSpec.from_manifest(read_manifest(run.out, verify=False))
    gen = torch.Generator().manual_seed(5)
    clips = [torch.randn(model.apm.num_mel_bins, 230, generator=gen),  # 2.3 s: chunks of 50, 50, 15 frames
             torch.randn(model.apm.num_mel_bins, 120, generator=gen)]  # 1.2 s: 50, 10 frames
    with torch.no_grad():
        expected = [model.encode_audio(c[None]).numpy() for c in clips]
    assert [len(e) for e in expected] == [23, 12]
    # the same graph with float32 state: the eager encoding within 1e-4
    for got, ref in zip(_encode_clips(StatefulAudioEncoder(run.audio.step, torch.float32), spec, clips), expected,
                        strict=True):
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    # the converted module itself (float16 state): within fp16 rounding of the cache
    run.audio.reset()
    both = _encode_clips(run.audio, spec, clips)
    assert run.audio.k_cache_0[..., 100:150, :].abs().amax() > 0  # clip 1's last chunk is still in the state
    for got, ref in zip(both, expected, strict=True):
        assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3
    run.audio.reset()
    alone = _encode_clips(run.audio, spec, clips[1:])
    run.audio.reset()
    assert np.array_equal(alone[0], both[1])  # stale slots: exact zero weights


def test_audio_turn_through_the_converter_modules(exported, tmp_path):
    """Session with an audio clip on the converter's modules (audio state, LLM state) = eager greedy tokens."""
    import soundfile as sf

    run = exported(AUDIO)
    ckpt, model, _ = quantized_reference(AUDIO)
    sf.write(tmp_path / "a.wav", speechlike(2.3), 16000)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "a.wav")}, "What is it?"]}]
    sampling = SamplingConfig(max_new_tokens=12)
    got = stateful_session(run).ask(messages, sampling)
    assert got.stats["audio_chunks"] == 3
    reference = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
    assert got.token_ids == reference.token_ids


# ----- macOS: the packages themselves through Core ML -------------------------------------------------------


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict runs on macOS 15+ only")
@pytest.mark.parametrize("name", MODELS)
def test_packages_predict_like_the_converter_modules(exported, name):
    run = exported(name)
    session = Session(run.out, "coreml")
    reference = stateful_session(run)
    sampling = SamplingConfig(max_new_tokens=16)
    messages = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    # vision: one package call per slice, against the converted torch module
    ckpt = Checkpoint.open(name)
    prompt = ckpt.prompts.build(messages)
    from minicpm.modeling import vision_inputs

    pre = session.manifest["preprocessing"]
    batch = vision_inputs(prompt.pixel_values, prompt.tgt_sizes, pre["patch_size"], pre["num_patches_per_side"],
                          session.manifest["model"]["hidden_size"], pad_to=session.max_patches)
    batch = {k: v.numpy() for k, v in batch.items()}
    got, expected = session.backend.vision(**batch), reference.backend.vision(**batch)
    assert np.abs(got - expected).max() < 5e-2 * max(1.0, np.abs(expected).max())
    # the whole chain: greedy tokens of the packages = those of the converter's modules
    assert session.ask(messages, sampling).token_ids == reference.ask(messages, sampling).token_ids


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict runs on macOS 15+ only")
def test_audio_package_predicts_like_the_converter_module(exported):
    run = exported(AUDIO)
    session = Session(run.out, "coreml")
    assert session.backend.owns_audio_cache
    spec = AudioStepSpec.from_manifest(session.manifest)
    clip = torch.randn(spec.n_mels, 230, generator=torch.Generator().manual_seed(5))
    run.audio.reset()
    expected = _encode_clips(run.audio, spec, [clip])[0]
    run.audio.reset()
    got = AudioChunker(spec, np.float16, owns_cache=True).encode(clip.numpy(), True, session.backend.audio)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 5e-2 * max(1.0, np.abs(expected).max())


def test_manifest_json_is_plain(exported):
    """The manifest is readable JSON with the packages listed as artifacts (what the iOS app reads)."""
    data = json.loads((exported("tiny-minicpm-v-4").out / "manifest.json").read_text())
    assert data["artifacts"]["llm"]["path"] == "llm.mlpackage"
    assert data["artifacts"]["llm"]["sha256_of"].startswith("directory tree")


@pytest.mark.parametrize("names", [("prefill", "decode"), ("main", "video")])
def test_merge_matches_coremltools_save_multifunction(tmp_path, names):
    """export/coreml_merge.py gives what coremltools' save_multifunction gives (functions, ops, every constant's
    value read back from the weight file), without loading the weights: shared ones stored once, a function's own
    shape-specific constant appended."""
    from export.coreml_merge import WEIGHTS, merge_packages

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(64, 48)

        def forward(self, x):  # the arange is a constant of each traced length: each function's own blob
            rows = int(x.shape[1])
            return self.proj(x) + torch.tensor(np.arange(rows * 48, dtype=np.float32).reshape(rows, 48) / 4)

    toy = Toy().eval()
    parts = {}
    for name, tokens in zip(names, (8, 1), strict=True):
        example = torch.randn(1, tokens, 64)
        mlmodel = ct.convert(torch.jit.trace(toy, example), inputs=[ct.TensorType(name="x", shape=example.shape)],
                             convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18, skip_model_load=True)
        parts[name] = tmp_path / f"{name}.mlpackage"
        mlmodel.save(str(parts[name]))
    ours, theirs = tmp_path / "ours.mlpackage", tmp_path / "theirs.mlpackage"
    merge_packages(parts, ours, names[1])
    desc = ct.utils.MultiFunctionDescriptor()
    for name, part in parts.items():
        desc.add_function(str(part), src_function_name="main", target_function_name=name)
    desc.default_function_name = names[1]
    ct.utils.save_multifunction(desc, str(theirs))

    def contents(path: Path) -> dict:
        program = _program(path)
        return {name: [(op.op_type, [np.asarray(v.val).tolist() for v in op.inputs.values() if v.val is not None],
                        [np.asarray(o.val).tolist() for o in op.outputs if op.op_type == "const"])
                       for op in function.operations] for name, function in program.functions.items()}

    assert contents(ours) == contents(theirs)
    spec = ct.utils.load_spec(str(ours))
    assert [f.name for f in spec.description.functions] == list(names)
    assert set(spec.mlProgram.functions) == set(names)
    assert spec.description.defaultFunctionName == names[1] and not spec.description.input
    offsets = {name: {op.outputs[0].name: op.attributes["val"].blobFileValue.offset
                      for op in spec.mlProgram.functions[name].block_specializations["CoreML8"].operations
                      if op.type == "const" and op.attributes["val"].WhichOneof("value") == "blobFileValue"}
               for name in names}
    prefill, decode = (set(offsets[name].values()) for name in names)
    assert len(prefill & decode) == 1  # the Linear's weight, one copy (the functions name it differently here)
    (own,) = decode - prefill
    assert own > max(prefill)  # the decode function's own constant, appended
    assert (ours / WEIGHTS).stat().st_size <= (theirs / WEIGHTS).stat().st_size + 256
