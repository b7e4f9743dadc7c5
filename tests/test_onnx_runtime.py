"""ONNX export + the reference runtime: graph parity, end-to-end tokens against the eager reference, the
chunked schedule, multi-turn cache reuse, the context-full policy and manifest refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from export.prompt_pieces import prompt_pieces
from minicpm.generation import SamplingConfig, generate
from minicpm.prompt import Prompt
from minicpm.split import LanguageModelStep, VisionStep
from runtime.manifest import read_manifest
from runtime.session import ContextFull, Session
from tests.conftest import noise_image, record_llm_calls

MAX_CONTEXT = 640
EXPORTS_AHEAD = [("onnx", name, "--max-context", str(MAX_CONTEXT))  # queued at session start
                 for name in ("tiny-minicpm-v-4", "tiny-minicpm-o-4.5")]


@pytest.fixture(scope="module")
def exported(exports):
    """name -> export directory (shared with the other modules through the session's `exports`)."""
    return lambda name: exports("onnx", name, "--max-context", str(MAX_CONTEXT))


IMAGES = [noise_image(200, 150, 1), noise_image(640, 480, 2), noise_image(300, 900, 3)]  # last two are sliced
PROMPTS = ["What is in this image?", "Describe the colours."]


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_graphs_match_torch_modules(exported, tiny, name):
    out = exported(name)
    manifest = read_manifest(out)
    assert manifest["parity"]["vision"] < 1e-4 and manifest["parity"]["llm"] < 1e-4
    ckpt, model = tiny(name)
    assert manifest["prompt"] == prompt_pieces(ckpt)  # the chat template as data, for the Swift ChatPrompt
    session = Session(out, "onnxruntime")
    # vision on real slices of every test image
    vision = VisionStep(model).eval()
    for img in IMAGES:
        prompt = ckpt.prompts.build([{"role": "user", "content": [img, "x"]}])
        batch = model.vision_inputs(prompt.pixel_values, prompt.tgt_sizes, pad_to=session.max_patches)
        with torch.no_grad():
            expected = vision(**batch).numpy()
        got = session.backend.vision(**{k: v.numpy() for k, v in batch.items()})
        assert np.abs(got - expected).max() < 1e-4
    # llm step at the three chunk widths the schedule uses
    step = LanguageModelStep(model, MAX_CONTEXT).eval()
    rng = np.random.RandomState(0)
    for tokens in (1, 7, 128):
        inputs = {"inputs_embeds": rng.randn(1, tokens, model.config.hidden_size).astype(np.float32),
                  "position_ids": np.arange(10, 10 + tokens)[None], "last_index": np.asarray([tokens - 1]),
                  "attention_mask": np.zeros((1, 1, tokens, MAX_CONTEXT + tokens), dtype=np.float32),
                  "past_keys": rng.randn(*session.keys.shape).astype(np.float32),
                  "past_values": rng.randn(*session.values.shape).astype(np.float32)}
        inputs["attention_mask"][..., 10:MAX_CONTEXT] = -1e30
        with torch.no_grad():
            expected = step(**{k: torch.from_numpy(v) for k, v in inputs.items()})
        for got, ref in zip(session.backend.llm(**inputs), expected, strict=True):
            assert np.abs(got - ref.numpy()).max() < 1e-4


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_end_to_end_tokens_match_eager_reference(exported, tiny, name):
    ckpt, model = tiny(name)
    session = Session(exported(name), "onnxruntime")
    sampling = SamplingConfig(max_new_tokens=32)
    for img in IMAGES:
        for text in PROMPTS:
            messages = [{"role": "user", "content": [img, text]}]
            reference = generate(model, ckpt.prompts.build(messages), ckpt.tokenizer, sampling, ckpt.stop_ids)
            session.reset()
            got = session.ask(messages, sampling)
            assert got.token_ids == reference.token_ids, (img.size, text)
            assert got.text == reference.text


@pytest.mark.parametrize("name", ["tiny-minicpm-v-4", "tiny-minicpm-o-4.5"])
def test_two_turn_conversation_reuses_the_cache(exported, tiny, name):
    ckpt, model = tiny(name)
    session = Session(exported(name), "onnxruntime")
    sampling = SamplingConfig(max_new_tokens=12)
    first = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    second = [{"role": "user", "content": [IMAGES[0], "Tell me more."]}]
    a1 = session.ask(first, sampling)
    a2 = session.ask(second, sampling)
    # The eager reference sees the whole conversation as one prompt: turn 1, answer 1, turn 2.
    t1 = ckpt.prompts.build(first)
    t2 = ckpt.prompts.build_turn(second, first_image=1)
    offset = len(t1.input_ids) + len(a1.token_ids)
    whole = Prompt(t1.input_ids + a1.token_ids + t2.input_ids,
                   t1.image_bounds + [(s + offset, e + offset) for s, e in t2.image_bounds], t1.images + t2.images)
    reference = generate(model, whole, ckpt.tokenizer, sampling, ckpt.stop_ids)
    assert a2.token_ids == reference.token_ids
    # only the new turn was prefilled (plus answer 1's last token when max_new_tokens cut it before it was fed)
    assert a2.stats["prompt_tokens"] == len(t2.input_ids) + (a1.stats["finish_reason"] == "length")
    ids = t2.input_ids
    assert ckpt.tokenizer.convert_ids_to_tokens(ids[:2]) == ["<|im_end|>", "Ċ"]  # closes answer 1, then "\n"
    assert [ids[i + 1] for i, t in enumerate(ids) if t == ckpt.tokenizer.convert_tokens_to_ids("<image_id>")] == [
        ckpt.tokenizer.convert_tokens_to_ids("1")]  # image ids continue across turns


def test_prefill_chunk_sizes_give_identical_tokens(exported):
    session = Session(exported("tiny-minicpm-v-4"), "onnxruntime")
    messages = [{"role": "user", "content": [IMAGES[1], PROMPTS[1]]}]
    results = {}
    for chunk in (1, 7, 128):
        session.chunk = chunk
        session.reset()
        results[chunk] = session.ask(messages, SamplingConfig(max_new_tokens=16)).token_ids
    assert results[1] == results[7] == results[128]


def test_steps_get_only_the_filled_cache_slots_and_unpadded_chunks(exported):
    """kv_cache.slots = "filled": every call gets the slots filled so far (none on the first), its mask spans them
    plus the new tokens; steps.prefill.min_tokens = 1: the last prefill chunk is not padded. The answer equals the
    older schedule's (every max_context slot, every chunk padded)."""
    out = exported("tiny-minicpm-v-4")
    schedule = read_manifest(out)["schedule"]
    assert schedule["kv_cache"]["slots"] == "filled" and schedule["steps"]["prefill"]["min_tokens"] == 1
    messages = [{"role": "user", "content": [IMAGES[1], PROMPTS[0]]}]
    answers = {}
    for new in (True, False):
        session = Session(out, "onnxruntime")
        session.filled_slots, session.min_prefill = new, (1 if new else None)
        recorded = record_llm_calls(session)
        answer = session.ask(messages, SamplingConfig(max_new_tokens=16))
        calls = [(int(c["position_ids"][0, 0]), c["past_keys"].shape, c["attention_mask"].shape) for c in recorded]
        answers[new] = answer.token_ids
        layers, heads, _, dim = session.keys.shape
        slots = [start if new else MAX_CONTEXT for start, _, _ in calls]
        assert [past for _, past, _ in calls] == [(layers, heads, n, dim) for n in slots]
        assert [mask[3] - mask[2] for _, _, mask in calls] == slots
        prompt, chunk = answer.stats["prompt_tokens"], session.chunk
        widths = [mask[2] for _, _, mask in calls[:-(len(answer.token_ids) - 1)]]  # the prefill calls
        rest = prompt % chunk or chunk
        assert widths == [chunk] * (len(widths) - 1) + [rest if new else chunk] and rest < chunk
    assert calls[0][0] == 0
    assert answers[True] == answers[False]


def test_torch_backend_runs_the_same_schedule(exported):
    messages = [{"role": "user", "content": [IMAGES[2], PROMPTS[0]]}]
    ort = Session(exported("tiny-minicpm-v-4"), "onnxruntime").ask(messages, SamplingConfig(max_new_tokens=16))
    eager = Session(exported("tiny-minicpm-v-4"), "torch").ask(messages, SamplingConfig(max_new_tokens=16))
    assert ort.token_ids == eager.token_ids


def test_context_full_policy(exported):
    session = Session(exported("tiny-minicpm-v-4"), "onnxruntime")
    session.manifest["tokenizer"]["stop_ids"] = [-1]  # never stop early: run into the wall
    with pytest.raises(ContextFull, match=f"context full after .* new tokens \\({MAX_CONTEXT} slots\\)"):
        session.ask([{"role": "user", "content": "hi"}], SamplingConfig(max_new_tokens=10_000))
    session.reset()
    session.on_context_full = "stop"
    out = session.ask([{"role": "user", "content": "hi"}], SamplingConfig(max_new_tokens=10_000))
    assert out.stats["finish_reason"] == "context_full" and session.cache_len == MAX_CONTEXT
    with pytest.raises(ContextFull, match="context full: the conversation needs"):
        session.ask([{"role": "user", "content": "more"}], SamplingConfig(max_new_tokens=4))
    session.reset()  # a reset conversation works again
    assert session.ask([{"role": "user", "content": "hi"}], SamplingConfig(max_new_tokens=4)).token_ids


@pytest.fixture
def export_copy(exported, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(exported("tiny-minicpm-v-4"), dst)
    return dst


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_tampered_artifact_is_refused(export_copy):
    with open(export_copy / "llm.onnx.data", "r+b") as f:
        f.seek(1000)
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(Exception, match=r"'llm.onnx.data' .* does not match its sha256"):
        Session(export_copy)


def test_missing_artifact_is_refused(export_copy):
    (export_copy / "vision.onnx").unlink()
    with pytest.raises(Exception, match=r"artifact 'vision' is missing \(vision.onnx\)"):
        Session(export_copy)


def test_unknown_schema_version_is_refused(export_copy):
    _edit_manifest(export_copy, lambda m: m.__setitem__("schema_version", 99))
    with pytest.raises(Exception, match="schema_version 99 is not supported"):
        Session(export_copy)


@pytest.mark.parametrize("path", ["../outside.onnx", "/etc/passwd", "sub/../../x"])
def test_escaping_paths_are_refused(export_copy, path):
    _edit_manifest(export_copy, lambda m: m["artifacts"]["vision"].__setitem__("path", path))
    with pytest.raises(Exception, match="(escapes the export directory|is absolute)"):
        Session(export_copy)


def test_invalid_manifest_names_the_field(export_copy):
    _edit_manifest(export_copy, lambda m: m["schedule"].__setitem__("prefill_chunk", 0))
    with pytest.raises(Exception, match="manifest.json is invalid at schedule/prefill_chunk"):
        Session(export_copy)


def test_cli_artifacts_matches_model(exported, images):
    import subprocess
    import sys

    from tests.conftest import ROOT

    common = ["--image", str(images[1]), "--prompt", "What is this?", "--max-new-tokens", "10", "--json"]
    runs = {}
    for source in (["--model", "tiny-minicpm-v-4"], ["--artifacts", str(exported("tiny-minicpm-v-4"))]):
        r = subprocess.run([sys.executable, "-m", "runtime.generate", *source, *common], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[source[0]] = json.loads(r.stdout)
    assert runs["--model"]["token_ids"] == runs["--artifacts"]["token_ids"]
    assert {"vision_ms_per_slice", "time_to_first_token_ms", "prefill_tok_s", "decode_tok_s",
            "peak_rss_mb"} <= set(runs["--artifacts"]["stats"])


def test_backend_follows_the_export(exported):
    assert Session(exported("tiny-minicpm-v-4")).backend.name == "onnxruntime"
