"""ExecuTorch export + ExecuTorchBackend: every method against its torch module, end-to-end greedy tokens
through the .pte against the eager reference (fp32 and 8da4w), the stateful cache across turns and resets,
XNNPACK / Core ML delegation, and the quantisation rules.

Lowering is slow, single-threaded Python (about a minute per tiny model), so the four exports of this module
start together as subprocesses, two at a time, when the first test asks for one.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from export.executorch import count_linears, install_records, prepare_model
from export.executorch_modules import (
    DECODER_INPUTS,
    StatefulDecoder,
    TokenEmbedding,
    as_tensor,
    decoder_inputs,
    vision_step,
)
from export.executorch_parity import decoder_parity, load_program
from minicpm.errors import UserError
from minicpm.generation import SamplingConfig, generate
from minicpm.prompt import Prompt
from minicpm.split import VisionStep
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import ROOT, noise_image, record_llm_calls

MAX_CONTEXT = 640
EXPORTS = {  # key -> (tiny model, extra exporter arguments)
    "tiny-minicpm-v-4": ("tiny-minicpm-v-4", []),
    "tiny-minicpm-o-4.5": ("tiny-minicpm-o-4.5", []),
    "8da4w": ("tiny-minicpm-v-4", ["--quant", "int4-rtn", "--group-size", "32"]),
    "coreml": ("tiny-minicpm-v-4", ["--backend", "coreml"]),
    "int8-vision": ("tiny-minicpm-v-4", ["--quant", "int4-rtn", "--lm-head", "int8", "--vision-weights", "int8"]),
}
EXPORTS_AHEAD = [("executorch", model, "--max-context", str(MAX_CONTEXT), *extra)  # queued at session start
                 for model, extra in EXPORTS.values()]
IMAGES = [noise_image(200, 150, 1), noise_image(640, 480, 2), noise_image(300, 900, 3)]  # last two are sliced
PROMPTS = ["What is in this image?", "Describe the colours."]
# 8da4w quantises activations per token at run time: an fp32 rounding difference flips int8 codes, and the
# tiny model's logits move by ~0.1 (measured: 1e-6 relative input noise moves eager logits by 0.06). A greedy
# divergence is accepted where the reference itself was that close to a tie.
MARGIN_TOLERANCE = 0.5


@pytest.fixture(scope="module")
def exported(exports):
    """key -> export directory (the session's shared exports; all of them started at once, two at a time)."""
    for model, extra in EXPORTS.values():
        exports.start("executorch", model, "--max-context", str(MAX_CONTEXT), *extra)
    return lambda key: exports("executorch", EXPORTS[key][0], "--max-context", str(MAX_CONTEXT), *EXPORTS[key][1])


def reference_tokens(ckpt, model, messages, max_new_tokens=32) -> list[int]:
    return generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, SamplingConfig(max_new_tokens=max_new_tokens),
                    ckpt.stop_ids).token_ids


# ----- every method against its torch module (fp32) -----------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_methods_match_torch_modules(exported, tiny, name):
    out = exported(name)
    manifest = read_manifest(out)
    assert manifest["format"] == "executorch" and manifest["artifacts"]["program"]["format"] == "pte"
    assert all(error < 1e-4 for error in manifest["parity"].values()), manifest["parity"]
    ckpt, model = tiny(name)
    session = Session(out, "executorch")
    program = load_program(out / "model.pte")
    # vision_encoder on every slice of every test image (the backend feeds one slice per call)
    vision = VisionStep(model).eval()
    for img in IMAGES:
        prompt = ckpt.prompts.build([{"role": "user", "content": [img, "x"]}])
        batch = model.vision_inputs(prompt.pixel_values, prompt.tgt_sizes, pad_to=session.max_patches)
        with torch.no_grad():
            expected = vision(**batch).numpy()
        got = session.backend.vision(**{k: v.numpy() for k, v in batch.items()})
        assert np.abs(got - expected).max() < 1e-4
    # the table is stored once, in token_embedding.bin (the export reads it from the checkpoint, not the model):
    # every row equals the model's lookup
    vocab = model.config.llm.vocab_size
    ids = torch.arange(vocab)[None]
    assert np.array_equal(session.table[ids[0].numpy()], TokenEmbedding(model)(ids)[0].detach().numpy())
    # text_decoder over whole schedules at the widths the host uses (1, 7, 128 tokens per call), each on a
    # freshly loaded program, against LanguageModelStep with a host-held cache
    for chunk in (7, 128):
        execute = load_program(out / "model.pte").load_method("text_decoder").execute
        assert decoder_parity(execute, model, MAX_CONTEXT, chunk, seed=chunk) < 1e-4
    # the runner's constant methods
    constants = {n: program.load_method(n).execute([]) for n in
                 ("get_max_seq_len", "get_max_context_len", "get_bos_id", "get_eos_ids", "use_kv_cache")}
    assert constants["get_max_seq_len"] == [128] and constants["get_max_context_len"] == [MAX_CONTEXT]
    assert constants["get_eos_ids"] == ckpt.stop_ids and constants["use_kv_cache"] == [True]
    assert constants["get_bos_id"][0] in ckpt.prompts.build([{"role": "user", "content": "x"}]).input_ids[:1]


# ----- end to end through runtime.session --------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_end_to_end_tokens_match_eager_reference(exported, tiny, name):
    ckpt, model = tiny(name)
    session = Session(exported(name), "executorch")
    sampling = SamplingConfig(max_new_tokens=32)
    for img in IMAGES:
        for text in PROMPTS:
            messages = [{"role": "user", "content": [img, text]}]
            reference = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
            for chunk in (7, 128):
                session.chunk = chunk
                session.reset()
                got = session.ask(messages, sampling)
                assert got.token_ids == reference.token_ids, (img.size, text, chunk)
                assert got.text == reference.text


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_two_turn_conversation_reuses_the_cache(exported, tiny, name):
    """Turn 2 carries an image: the vision call between turns must leave the cache alone (it lives in its
    own memory, share_mutable_buffers), and only the new turn is prefilled."""
    ckpt, model = tiny(name)
    session = Session(exported(name), "executorch")
    sampling = SamplingConfig(max_new_tokens=32)
    first = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    second = [{"role": "user", "content": [IMAGES[0], "Tell me more."]}]
    for chunk in (7, 128):
        session.chunk = chunk
        session.reset()
        a1 = session.ask(first, sampling)
        a2 = session.ask(second, sampling)
        t1 = ckpt.prompts.build(first)
        t2 = ckpt.prompts.build_turn(second, first_image=1)
        offset = len(t1.input_ids) + len(a1.token_ids)
        whole = Prompt(t1.input_ids + a1.token_ids + t2.input_ids,
                       t1.image_bounds + [(s + offset, e + offset) for s, e in t2.image_bounds], t1.images + t2.images)
        assert a1.token_ids == reference_tokens(ckpt, model, first)
        assert a2.token_ids == generate(model, whole, ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids, chunk
        assert a2.stats["prompt_tokens"] == len(t2.input_ids) + (a1.stats["finish_reason"] == "length")


def test_the_last_prefill_chunk_is_not_padded(exported):
    """XNNPACK's text_decoder takes T = 1..chunk (steps.prefill.min_tokens = 1): a prompt's last chunk goes in at its
    own length, and the answer equals the padded schedule's; the Core ML delegate's fixed prefill keeps padding."""
    assert "min_tokens" not in read_manifest(exported("coreml"))["schedule"]["steps"]["prefill"]
    out = exported("tiny-minicpm-v-4")
    assert read_manifest(out)["schedule"]["steps"]["prefill"]["min_tokens"] == 1
    messages = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    answers = {}
    for padded in (False, True):
        session = Session(out, "executorch")
        session.chunk, session.min_prefill = 7, (None if padded else 1)
        calls = record_llm_calls(session)
        answer = session.ask(messages, SamplingConfig(max_new_tokens=16))
        widths = [c["inputs_embeds"].shape[1] for c in calls]
        prefill = widths[:len(widths) - (len(answer.token_ids) - 1)]
        rest = answer.stats["prompt_tokens"] % 7
        assert 0 < rest and prefill == [7] * (len(prefill) - 1) + [7 if padded else rest]
        answers[padded] = answer.token_ids
    assert answers[False] == answers[True]


def test_reset_zeroes_the_cache_in_place(exported):
    """reset() zeroes the program's cache buffers through their names (no reload): a conversation after a
    reset is bit-identical to one on a freshly loaded program."""
    out = exported("tiny-minicpm-v-4")
    session = Session(out, "executorch")
    messages = [{"role": "user", "content": [IMAGES[0], PROMPTS[1]]}]
    session.ask([{"role": "user", "content": [IMAGES[2], PROMPTS[0]]}], SamplingConfig(max_new_tokens=8))
    assert any(float(b.abs().sum()) > 0 for b in session.backend.cache)
    program = session.backend.program
    session.reset()
    assert session.backend.program is program and all(float(b.abs().sum()) == 0 for b in session.backend.cache)
    fresh = Session(out, "executorch").ask(messages, SamplingConfig(max_new_tokens=16))
    assert session.ask(messages, SamplingConfig(max_new_tokens=16)).token_ids == fresh.token_ids


# ----- 8da4w --------------------------------------------------------------------------------------------


def _margin(model, prompt: Prompt, reference: list[int], got: list[int], step: int, stop_ids: list[int]) -> float:
    """The reference's logit margin at `step` (shared prefix) between its token and the program's token
    (a stop token where one sequence ended)."""
    with torch.no_grad():
        vision = model.encode(prompt.images)
        prefix = model.prompt_embeddings(torch.tensor(prompt.input_ids), prompt.image_bounds, vision)
        generated = model.embed_generated(torch.tensor(reference[:step], dtype=torch.long))
        logits = model.llm(inputs_embeds=torch.cat([prefix, generated])[None], logits_to_keep=1).logits[0, -1]

    def pick(tokens: list[int]) -> int:
        return tokens[step] if step < len(tokens) else max(stop_ids, key=lambda t: float(logits[t]))

    return float(logits[pick(reference)] - logits[pick(got)])


def test_8da4w_tokens_match_quantized_reference(exported, tiny_path):
    from minicpm.checkpoint import Checkpoint

    out = exported("8da4w")
    manifest = read_manifest(out)
    quant = manifest["quantization"]
    assert quant["method"] == "int4-rtn" and quant["symmetric"] and quant["scheme"] == "8da4w"
    assert quant["group_size"] == 32 and quant["layers"] == 14
    decoder = manifest["artifacts"]["program"]["methods"]["text_decoder"]["delegation"]
    assert decoder["linear_delegated"] == decoder["linear_ops"] == 15  # every int4 linear + the fp32 head
    # the PyTorch reference of the same quantisation: torchao 8da4w weights from the same symmetric records
    ckpt = Checkpoint.open("tiny-minicpm-v-4")
    model, info, facts = prepare_model(ckpt, "int4-rtn", 32)
    assert info.int4_layers == 14 and facts["scale_dtype"] == "bfloat16"
    assert manifest["parity"]["text_decoder"] < 0.5 and manifest["parity"]["vision_encoder"] < 1e-4
    session = Session(out, "executorch")
    sampling = SamplingConfig(max_new_tokens=32)
    divergences = []
    for img in IMAGES:
        for text in PROMPTS:
            messages = [{"role": "user", "content": [img, text]}]
            prompt = ckpt.prompts.build(messages)
            reference = generate(model, prompt, ckpt.tokenizer, sampling, ckpt.stop_ids).token_ids
            for chunk in (7, 128):
                session.chunk = chunk
                session.reset()
                got = session.ask(messages, sampling).token_ids
                if got == reference:
                    continue
                step = next(i for i in range(len(got) + 1) if i >= len(reference) or got[i] != reference[i])
                margin = _margin(model, prompt, reference, got, step, ckpt.stop_ids)
                divergences.append(f"{img.size} {text!r} chunk {chunk}: step {step}, reference margin {margin:.3f}")
                assert margin < MARGIN_TOLERANCE, divergences[-1]
    if divergences:
        warnings.warn("8da4w greedy divergences from the torchao reference (near-ties): " + "; ".join(divergences),
                      stacklevel=1)
    assert len(divergences) <= 4  # of 12 runs: anything more is not near-tie noise


def test_quantised_checkpoints_bring_their_records(tiny_path, tmp_path):
    """A `quant.awq` output directory is exported with its own records; asymmetric ones are refused (XNNPACK's
    int4 kernels have no zero points), as is a --quant that names another method."""
    from minicpm.checkpoint import Checkpoint
    from quant import QuantConfig, rtn_quantize
    from quant.checkpoint import write_quantized

    source = Checkpoint.open("tiny-minicpm-v-4")
    for symmetric in (True, False):
        model, _ = source.load_model("float32")
        result = rtn_quantize(model, QuantConfig(group_size=32, symmetric=symmetric))
        write_quantized(result, source.path, tmp_path / f"symmetric-{symmetric}")
    ckpt = Checkpoint.open(tmp_path / "symmetric-True")
    model, info, _ = prepare_model(ckpt, "int4-rtn")
    assert info.int4_layers == 14 and info.group_size == 32  # the records' group size
    with pytest.raises(UserError, match=r"already quantised \(int4-rtn\); drop --quant or pass --quant int4-rtn"):
        prepare_model(ckpt, "int4-awq")
    with pytest.raises(UserError, match="holds group size 32, not --group-size 128"):
        prepare_model(ckpt, None, 128)
    with pytest.raises(UserError, match="asymmetric records .* quant.awq --symmetric"):
        prepare_model(Checkpoint.open(tmp_path / "symmetric-False"), "int4-rtn")


def test_records_become_exact_torchao_weights(tiny_path):
    """Symmetric records (AWQ and RTN share the format) -> torchao int4 weights holding the records' codes;
    scales rounded to bfloat16 exactly as XNNPACK stores them (Core ML keeps float16); an int8 lm_head record
    becomes an int8 per-channel weight with exact scales."""
    import copy

    from minicpm.checkpoint import Checkpoint
    from quant import QuantConfig, rtn_quantize

    model, _ = Checkpoint.open("tiny-minicpm-v-4").load_model("float32")
    records = rtn_quantize(model, QuantConfig(group_size=32, symmetric=True, lm_head="int8")).records
    name = "llm.model.layers.0.mlp.down_proj"
    for bf16, activations in ((True, True), (False, False)):
        target = copy.deepcopy(model)
        facts = install_records(target, records, activations_int8=activations, bf16_scales=bf16)
        assert facts["scheme"] == ("8da4w" if activations else "int4 weight-only") and len(records) == 15
        head = target.get_submodule("llm.lm_head").weight
        assert torch.equal(head.qdata.to(torch.int16) + 128, records["llm.lm_head"].codes.to(torch.int16))
        assert torch.equal(head.scale, records["llm.lm_head"].scales.float())  # per channel: never rounded
        weight = target.get_submodule(name).weight
        record = records[name]
        assert torch.equal(weight.qdata.to(torch.int16) + 8, record.codes.to(torch.int16))
        scales = record.scales.float().to(torch.bfloat16).float() if bf16 else record.scales.float()
        assert torch.equal(weight.scale, scales)
        assert (weight.activation_quantization is not None) == activations


# ----- delegation ---------------------------------------------------------------------------------------


def _execution_plans(path: Path) -> list:
    """The .pte's execution plans (one per method), read from the file itself."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = deserialize_pte_binary(path.read_bytes())
    return getattr(pte, "program", pte).execution_plan


def _delegates(path: Path) -> dict[str, list[str]]:
    """Method -> backend ids of its delegate calls."""
    return {plan.name: [d.id for d in plan.delegates] for plan in _execution_plans(path)}


def _portable_ops(path: Path) -> dict[str, list[str]]:
    """Method -> the kernel names of its non-delegated instructions, in order."""
    out = {}
    for plan in _execution_plans(path):
        names = [op.name for op in plan.operators]
        out[plan.name] = [names[i.instr_args.op_index] for chain in plan.chains for i in chain.instructions
                          if hasattr(i.instr_args, "op_index")]
    return out


def test_int8_vision_is_delegated_smaller_and_close_to_the_float_step(exported, tiny):
    """`--vision-weights int8`: every vision Linear runs in XNNPACK as 8da8w, the vision method holds about a
    quarter of the float program's vision bytes, and on every slice of every test image its features stay close to
    the float torch step (cosine >= 0.99) while differing from it; the manifest says so and measures the move."""
    from export.executorch_weights import VISION_INT8

    out, float_out = exported("int8-vision"), exported("tiny-minicpm-v-4")
    manifest = read_manifest(out)
    assert manifest["quantization"]["vision"] == VISION_INT8 and manifest["quantization"]["lm_head"] == "int8"
    assert manifest["parity"]["vision_encoder"] > 1e-4  # against the float step: int8 moved it
    methods, float_methods = (read_manifest(o)["artifacts"]["program"]["methods"] for o in (out, float_out))
    vision = methods["vision_encoder"]["delegation"]
    assert vision["linear_delegated"] == vision["linear_ops"] == float_methods["vision_encoder"]["delegation"][
        "linear_ops"]
    ckpt, model = tiny("tiny-minicpm-v-4")
    # int8 stores each Linear weight in a quarter of its float32 bytes (plus a scale per output channel)
    linear_bytes = 4 * sum(m.weight.numel() for m in vision_step(model).modules() if isinstance(m, torch.nn.Linear))
    saved = float_methods["vision_encoder"]["delegation"]["bytes"] - vision["bytes"]
    assert 0.7 * linear_bytes <= saved <= 0.75 * linear_bytes, (saved, linear_bytes)
    session = Session(out, "executorch")
    step = VisionStep(model).eval()
    for img in IMAGES:
        prompt = ckpt.prompts.build([{"role": "user", "content": [img, "x"]}])
        batch = model.vision_inputs(prompt.pixel_values, prompt.tgt_sizes, pad_to=session.max_patches)
        with torch.no_grad():
            expected = step(**batch).numpy().ravel()
        got = session.backend.vision(**{k: v.numpy() for k, v in batch.items()}).ravel()
        cosine = float(got @ expected / np.linalg.norm(got) / np.linalg.norm(expected))
        assert 0.99 <= cosine < 1 - 1e-9, cosine
    answer = session.ask([{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}], SamplingConfig(max_new_tokens=8))
    assert len(answer.token_ids) >= 1


def test_int8_vision_needs_xnnpack(tmp_path):
    from export.executorch import main

    with pytest.raises(UserError, match=r"^--vision-weights int8 is an XNNPACK scheme"):
        main(["--model", "tiny-minicpm-v-4", "--out", str(tmp_path / "x"), "--backend", "coreml", "--vision-weights",
              "int8"])
    assert not (tmp_path / "x").exists()


def test_program_delegates_linear_layers_to_xnnpack(exported, tiny):
    out = exported("tiny-minicpm-v-4")
    delegates = _delegates(out / "model.pte")
    assert set(delegates) >= {"vision_encoder", "text_decoder", "get_max_seq_len",
                              "get_max_context_len", "get_bos_id", "get_eos_ids", "use_kv_cache"}
    # no token_embedding method: it stored the table a second time and no host called it (the hosts read
    # token_embedding.bin; see export/executorch.py)
    assert "token_embedding" not in delegates
    for method in ("vision_encoder", "text_decoder"):
        assert delegates[method] and set(delegates[method]) == {"XnnpackBackend"}
    methods = read_manifest(out)["artifacts"]["program"]["methods"]
    _, model = tiny("tiny-minicpm-v-4")
    decoder = methods["text_decoder"]["delegation"]
    linears = sum(isinstance(m, torch.nn.Linear) for m in StatefulDecoder(model, 8, 2).modules())
    assert decoder["linear_delegated"] == decoder["linear_ops"] == linears == 2 * 7 + 1  # every layer + lm_head
    # Vision: every Linear (the resampler's packed attention in-projection split into three, see
    # SplitProjectionAttention) plus the resampler's bare `@ proj` matrix.
    vision = methods["vision_encoder"]["delegation"]
    assert vision["linear_delegated"] == vision["linear_ops"] == count_linears(vision_step(model)) + 1
    # Norms, attention and MLPs in as few XNNPACK subgraphs as the ops allow (export.executorch_lowering's passes,
    # the layer norms as means, attention without SDPA's masked-row guard): the vision step is one subgraph after
    # the position-embedding lookup (a gather, left portable with the patch mask), the decoder's norms are delegated.
    assert vision["subgraphs"] == 2, vision
    portable = _portable_ops(out / "model.pte")
    assert not {"aten::native_layer_norm", "aten::any", "aten::logical_not"} & set(portable["vision_encoder"])
    assert "aten::mean" not in portable["text_decoder"], portable["text_decoder"]


def test_coreml_program_structure(exported):
    """Core ML programs build on Linux but load on Apple platforms only: checked structurally."""
    out = exported("coreml")
    manifest = read_manifest(out)
    assert manifest["artifacts"]["program"]["backend"] == "CoreMLBackend"
    delegates = _delegates(out / "model.pte")
    assert delegates["vision_encoder"] == ["CoreMLBackend"]  # the whole vision step in one Core ML model
    for method in ("text_decoder", "prefill"):  # static T = 1 and T = prefill_chunk, sharing the cache
        assert delegates[method] and set(delegates[method]) == {"CoreMLBackend"}
    assert "token_embedding" not in delegates  # the table is token_embedding.bin only
    steps = manifest["schedule"]["steps"]
    assert steps["prefill"]["function"] == "prefill" and steps["decode"]["function"] == "text_decoder"
    assert manifest["artifacts"]["program"]["constant_methods"]["enable_dynamic_shape"] is False
    for method in ("text_decoder", "prefill"):
        delegation = manifest["artifacts"]["program"]["methods"][method]["delegation"]
        assert delegation["linear_delegated"] == delegation["linear_ops"] == 15
    with pytest.raises(UserError, match="Apple platforms"):
        Session(out, "executorch")


def test_wrong_format_is_refused(exported):
    with pytest.raises(UserError, match="backend onnxruntime runs ONNX exports"):
        Session(exported("tiny-minicpm-v-4"), "onnxruntime")


def test_decoder_writes_pad_rows_into_the_slack(tiny):
    """Eager check of the write-position design: a padded last chunk at the end of the context stays in
    bounds (pad rows land in the slack) and matches the host-cache step exactly."""
    _, model = tiny("tiny-minicpm-v-4")
    decoder = StatefulDecoder(model, 32, 8).eval()
    rng = np.random.RandomState(0)
    hidden = model.config.hidden_size
    inputs = decoder_inputs(rng.randn(3, hidden).astype(np.float32), 29, 8, 32)  # 3 real rows + 5 pad rows
    inputs["inputs_embeds"][0, 3:] = rng.randn(5, hidden)  # non-zero pad rows, to see where they land
    with torch.no_grad():
        decoder(*[as_tensor(inputs[k]) for k in DECODER_INPUTS])
    written = decoder.v_cache_0[0, 0].abs().sum(-1)
    assert decoder.v_cache_0.shape[2] == decoder.k_cache_0.shape[3] == 32 + 8
    assert bool((written[29:37] > 0).all()) and float(written[:29].sum()) == 0 and float(written[37:].sum()) == 0


def test_generate_defaults_to_the_exports_own_runtime(exported):
    """`runtime.generate --artifacts DIR` with no --backend runs an ExecuTorch export on executorch."""
    out = exported("tiny-minicpm-v-4")
    assert Session(out).backend.name == "executorch"
    r = subprocess.run([sys.executable, "-m", "runtime.generate", "--artifacts", str(out), "--prompt", "Hi",
                        "--max-new-tokens", "4", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import json  # noqa: PLC0415

    result = json.loads(r.stdout)
    assert result["stats"]["backend"] == "executorch"
    expected = Session(out, "executorch").ask([{"role": "user", "content": "Hi"}], SamplingConfig(max_new_tokens=4))
    assert result["token_ids"] == expected.token_ids


# ----- audio (MiniCPM-o) --------------------------------------------------------------------------------


def test_audio_encoder_matches_audio_chunk_step(exported, tiny):
    """`audio_encoder` through the backend, chunk by chunk with its cache in the program, against AudioChunkStep
    with a host-held cache; its buffers and the LLM's never touch each other (live audio interleaves them)."""
    from export.bundle import audio_example
    from minicpm.split import AudioChunkStep

    out = exported("tiny-minicpm-o-4.5")
    manifest = read_manifest(out)
    assert manifest["schedule"]["steps"]["audio"]["function"] == "audio_encoder"
    assert manifest["schedule"]["steps"]["audio"]["artifact"] == "program"
    assert manifest["schedule"]["audio_cache"]["location"] == "program mutable buffers"
    assert manifest["parity"]["audio"] < 1e-4
    _, model = tiny("tiny-minicpm-o-4.5")
    session = Session(out)
    backend = session.backend
    assert backend.name == "executorch" and backend.owns_audio_cache
    session.ask([{"role": "user", "content": "Hi"}], SamplingConfig(max_new_tokens=2))
    llm_cache = [b.clone() for b in backend.cache]
    assert any(float(b.abs().sum()) > 0 for b in llm_cache)
    step = AudioChunkStep(model).eval()
    empty = np.zeros((0,), dtype=np.float32)
    for chunk in audio_example(model):  # first, middle (filled cache), short last
        with torch.no_grad():
            expected = step(**chunk)[0].numpy()
        inputs = {k: v.numpy() for k, v in chunk.items() if not k.startswith("past_")}
        tokens, new_keys, new_values = backend.audio(**inputs, past_keys=empty, past_values=empty)
        assert new_keys is None and new_values is None and tokens.shape == expected.shape
        assert np.abs(tokens - expected).max() < 1e-4
    assert all(torch.equal(a, b) for a, b in zip(backend.cache, llm_cache, strict=True))
    audio_cache = [backend.audio_method._method.get_attribute(f"audio_{kind}_cache_{i}")  # aliases the program's
                   for i in range(len(model.apm.layers)) for kind in ("k", "v")]
    written = [b.clone() for b in audio_cache]
    assert all(float(b.abs().sum()) > 0 for b in written)
    session.ask([{"role": "user", "content": "Tell me more."}], SamplingConfig(max_new_tokens=2))
    assert all(torch.equal(a, b) for a, b in zip(audio_cache, written, strict=True))


def test_audio_message_tokens_match_eager_reference(exported, tiny, tmp_path):
    """A 2.3 s speech-like clip (3 chunks, the last one short) + a question through the export's own runtime:
    the greedy tokens equal eager generate's."""
    import soundfile as sf

    rng = np.random.RandomState(0)
    t = np.arange(int(16000 * 2.3)) / 16000
    wave = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.1 * np.sin(2 * np.pi * 660 * t)
    sf.write(tmp_path / "clip.wav", (wave + 0.05 * rng.randn(len(t))).astype(np.float32), 16000)
    messages = [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "clip.wav")},
                                             "What did you hear?"]}]
    ckpt, model = tiny("tiny-minicpm-o-4.5")
    got = Session(exported("tiny-minicpm-o-4.5")).ask(messages, SamplingConfig(max_new_tokens=16))
    assert got.stats["audio_chunks"] == 3
    assert got.token_ids == reference_tokens(ckpt, model, messages, max_new_tokens=16)
