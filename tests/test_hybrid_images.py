"""Images through the ONNX chain of MiniCPM-V 4.6 / 4.7: vision.onnx (one slice per call, fixed patch row) against
the torch step, greedy tokens through the whole chain (processor, vision per slice, scatter, chunked prefill with
state, decode) against transformers' own `generate` with its processor for three images (one unsliced, two sliced)
at prefill chunks 7 and 128, two-turn conversations with an image in turn 1 (and, through the canvas positions of
4.7, in turn 2), and a check that the comparisons can fail (image content moves the logits, and the chain's
prefill logits follow transformers' for two image sets).

The exports are test_hybrid_onnx's (same command, so each runs once per session)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpm.generation import SamplingConfig
from minicpm.hybrid_vision import HybridVisionStep, max_patches_bound, split_slices
from minicpm.v4_6 import canvas_positions, prompt_inputs, prompt_positions
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import ROOT, noise_image
from tests.test_hybrid_onnx import MAX_CONTEXT, NAMES

SIZES = [(200, 150), (640, 480), (300, 900)]  # (width, height): not sliced, sliced 1x2, tall (3x1 + source)
QUESTION = "What is in these images?"
NEW = 12
EXPORTS_AHEAD = [("onnx", name, "--max-context", str(MAX_CONTEXT)) for name in NAMES]  # queued at session start


@pytest.fixture(scope="module")
def exported(exports):
    for name in NAMES:
        exports.start("onnx", name, "--max-context", str(MAX_CONTEXT))
    return lambda name: exports("onnx", name, "--max-context", str(MAX_CONTEXT))


def _images(seed: int = 0) -> list:
    return [noise_image(width, height, seed=seed + i) for i, (width, height) in enumerate(SIZES)]


def _generate(ckpt, model, inputs: dict, new: int = NEW) -> list[int]:
    """transformers' own greedy generate on the processor's tensors (stop tokens dropped)."""
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=new, do_sample=False, eos_token_id=ckpt.stop_ids,
                             pad_token_id=ckpt.stop_ids[0])
    return [t for t in out[0, inputs["input_ids"].shape[1]:].tolist() if t not in ckpt.stop_ids]


_REFERENCES: dict = {}  # (name, what) -> reference tokens: the chunk parameter never changes a reference


def _memo(key: tuple, compute):
    if key not in _REFERENCES:
        _REFERENCES[key] = compute()
    return _REFERENCES[key]


def _three_image_reference(ckpt, model, name: str, seed: int) -> tuple[dict, list[int]]:
    """(the processor's tensors, greedy tokens) of transformers' processor + generate on the three images
    (memoised: the chunk parameter does not change the reference)."""
    def compute():
        chat = [{"role": "user", "content": [{"type": "image"}] * 3 + [{"type": "text", "text": QUESTION}]}]
        inputs = dict(prompt_inputs(ckpt.processor, chat, images=_images(seed)))
        return inputs, _generate(ckpt, model, inputs)

    return _memo((name, "three images", seed), compute)


def _conversation_inputs(ckpt, ids: list[int], images: list) -> dict:
    """A whole conversation's token ids with its images as transformers' generate takes them: the image
    processor's tensors (slices in placeholder order) and, for 4.7's canvas positions, the modality of every
    token."""
    input_ids = torch.tensor([ids])
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    if images:
        processed = ckpt.processor.image_processor(images, return_tensors="pt")
        inputs.update(pixel_values=processed["pixel_values"], target_sizes=processed["target_sizes"])
    if ckpt.variant.canvas_positions:
        inputs["mm_token_type_ids"] = torch.tensor(ckpt.processor.create_mm_token_type_ids([ids]))
    return inputs


@pytest.mark.parametrize("name", NAMES)
def test_vision_graph_matches_torch_step(exported, hybrid, name):
    """The manifest lists the vision step's layout as data; the graph equals HybridVisionStep within 1e-4 on slices
    of all three images (source images and grid cells, each padded to the row), through the session's backend."""
    out = exported(name)
    manifest = read_manifest(out)
    ckpt, model = hybrid(name)
    ip = ckpt.processor.image_processor
    bound = max_patches_bound(ip.scale_resolution, ip.patch_size, ip.downsample_mode)
    step = manifest["schedule"]["steps"]["vision"]
    assert manifest["parity"]["vision"] < 1e-4  # measured by the exporter on the slices of a sliced photo
    assert step["max_patches"] == bound == 1200 == manifest["preprocessing"]["max_patches"]
    assert step["slices_per_call"] == 1 and step["rows"] == bound // 16 and step["downsample_mode"] == "16x"
    assert step["inputs"] == ["pixel_values", "position_ids", "patch_order", "patch_mask"]
    assert (step["window"], step["merge"], step["block"]) == (2, [2, 2], [4, 4])
    assert manifest["schedule"]["modalities"] == ["text", "image"]
    vision = manifest["artifacts"]["vision"]
    assert [t["shape"] for t in vision["inputs"]] == [[1, 3, 14, 14 * bound], [bound], [bound], [bound]]
    torch_step = HybridVisionStep(model).eval()
    backends = [Session(out, name).backend for name in ("onnxruntime", "torch")]  # torch: HybridTorchBackend
    slices = split_slices(ip(_images(), return_tensors="pt"))
    assert len(slices) == 8
    for one in slices[:2] + slices[-2:]:  # the unsliced image, the 640x480 source, the tall one's last cells
        inputs = torch_step.vision_inputs(one, bound)
        with torch.no_grad():
            expected = torch_step(**{k: torch.from_numpy(v) for k, v in inputs.items()}).numpy()
        for backend in backends:
            got = backend.vision(**inputs)
            assert got.shape == expected.shape == (75, model.config.text_config.hidden_size)
            assert np.abs(got - expected).max() < 1e-4, backend.name


@pytest.mark.parametrize("chunk", [7, 128])
@pytest.mark.parametrize("name", NAMES)
def test_three_images_greedy_tokens_equal_transformers_generate(exported, hybrid, name, chunk):
    ckpt, model = hybrid(name)
    session = Session(exported(name), "onnxruntime")
    session.chunk = chunk  # the graph's token count is dynamic up to the export's --prefill-chunk
    inputs, expected = _three_image_reference(ckpt, model, name, 0)
    got = session.ask([{"role": "user", "content": [*_images(), QUESTION]}], SamplingConfig(max_new_tokens=NEW))
    prompt = inputs["input_ids"].shape[1]
    assert got.stats["prompt_tokens"] == prompt and got.stats["images"] == 3 and got.stats["slices"] == 8
    assert got.token_ids == expected
    assert len(set(got.token_ids)) > 1
    if ckpt.variant.canvas_positions:  # 4.7: the canvas makes decode positions trail the sequence index
        positions, delta = prompt_positions(model, inputs)
        assert (session.turn_positions[1] == positions.numpy()).all() and session.rope_delta == delta < 0
    else:
        assert session.turn_positions is None and session.rope_delta == 0


def _prefill_logits(session: Session, messages: list[dict]) -> np.ndarray:
    """The logits the chain's prefill hands to decode (decode stubbed: nothing is generated)."""
    seen = []
    session.decode = lambda logits, sampling, on_text: (seen.append(logits), ([], "", "stop"))[1]
    session.ask(messages, SamplingConfig(max_new_tokens=1))
    return seen[0]


@pytest.mark.parametrize("name", NAMES)
def test_image_content_reaches_the_llm(exported, hybrid, name):
    """The token comparisons can fail: the tiny model's greedy answers barely depend on noise images, so this
    checks at the logits. Other images of the same sizes move transformers' last-position logits by far more than
    1e-4, and the chain's prefill logits equal transformers' within 1e-4 for both image sets (a chain that drops,
    reorders or misplaces slice features, or positions them wrongly, is caught)."""
    ckpt, model = hybrid(name)
    logits = {}
    for seed in (0, 10):
        inputs, _ = _three_image_reference(ckpt, model, name, seed)
        with torch.no_grad():
            logits[seed] = model(**inputs, use_cache=False).logits[0, -1].numpy()  # no cache: same logits, faster
        got = _prefill_logits(Session(exported(name), "onnxruntime"),
                              [{"role": "user", "content": [*_images(seed), QUESTION]}])
        assert np.abs(got - logits[seed]).max() < 1e-4
    assert np.abs(logits[0] - logits[10]).max() > 1e-2


@pytest.mark.parametrize("chunk", [7, 128])
@pytest.mark.parametrize("name", NAMES)
def test_two_turns_image_then_text(exported, hybrid, name, chunk):
    """Turn 1 holds a sliced image, turn 2 is text: turn 2 continues the state (4.7: after the canvas delta) and
    equals generate on the whole conversation."""
    ckpt, model = hybrid(name)
    session = Session(exported(name), "onnxruntime")
    session.chunk = chunk
    image = noise_image(640, 480, seed=1)
    first = [{"role": "user", "content": [image, "Describe it."]}]
    second = [{"role": "user", "content": ["Tell me more about the colours."]}]
    a1 = session.ask(first, SamplingConfig(max_new_tokens=8))
    a2 = session.ask(second, SamplingConfig(max_new_tokens=NEW))
    t1, t2 = ckpt.prompts.build(first), ckpt.prompts.build_turn(second, 1)
    assert a1.token_ids == _memo((name, "turn 1"), lambda: _generate(
        ckpt, model, _conversation_inputs(ckpt, t1.input_ids, [image]), 8))
    pending = int(a1.stats["finish_reason"] == "length")  # an answer cut by max_new_tokens: its last token leads
    ids = t1.input_ids + a1.token_ids + t2.input_ids
    assert a2.stats["prompt_tokens"] == pending + len(t2.input_ids) and a2.stats["images"] == 0
    assert a2.token_ids == _memo((name, "image then text"), lambda: _generate(
        ckpt, model, _conversation_inputs(ckpt, ids, [image])))


@pytest.mark.parametrize("chunk", [7, 128])
def test_two_turns_with_an_image_in_each_4_7(exported, hybrid, chunk):
    """4.7, an image in turn 2: the turn's canvas positions, computed over its own tokens and placed after the
    state's last position, equal the model's get_rope_index over the whole conversation, and the tokens equal
    generate on the whole conversation (both images, ids numbered across turns)."""
    name = NAMES[1]
    ckpt, model = hybrid(name)
    session = Session(exported(name), "onnxruntime")
    session.chunk = chunk
    images = [noise_image(640, 480, seed=1), noise_image(300, 900, seed=2)]
    first = [{"role": "user", "content": [images[0], "Describe it."]}]
    second = [{"role": "user", "content": [images[1], "And this one?"]}]
    a1 = session.ask(first, SamplingConfig(max_new_tokens=8))
    a2 = session.ask(second, SamplingConfig(max_new_tokens=NEW))
    t1, t2 = ckpt.prompts.build(first), ckpt.prompts.build_turn(second, 1)
    assert "<image_id>1</image_id>" in ckpt.tokenizer.decode(t2.input_ids)  # numbered across the conversation
    ids = t1.input_ids + a1.token_ids + t2.input_ids
    inputs = _conversation_inputs(ckpt, ids, images)
    positions, delta = prompt_positions(model, inputs)
    start, table = session.turn_positions
    pending = int(a1.stats["finish_reason"] == "length")
    assert start == len(t1.input_ids) + len(a1.token_ids) - pending  # turn 2 starts at the pending token, if any
    assert (table == positions[:, start:].numpy()).all() and session.rope_delta == delta
    # the layout is relative: the turn alone, shifted, gives the same table
    alone, _ = canvas_positions(ckpt.variant.model_class, ckpt.config, ids[start:], t2.tgt_sizes)
    assert (alone + positions[0, start].item() == table).all()
    assert a2.token_ids == _memo((name, "image in each turn"), lambda: _generate(ckpt, model, inputs))


def test_generate_parity_runs_the_image_through_both_sides(exported, capsys):
    """`runtime.generate --parity` on a hybrid export: the eager reference (transformers' generate) gets the image too
    (a text-only reference parts at token 0 on 4.7 with the committed house photo)."""
    from runtime.generate import main

    image = ROOT / "examples" / "house.png"
    assert main(["--artifacts", str(exported("tiny-minicpm-v-4.7")), "--image", str(image), "--prompt", QUESTION,
                 "--max-new-tokens", "8", "--parity"]) == 0
    assert "agree on all 8 greedy tokens" in capsys.readouterr().out
