"""The manifest's "prompt" pieces rebuild exactly what PromptBuilder builds (text, ids, image spans), for every
tiny checkpoint; templates that cannot be cut into pieces are refused."""

from __future__ import annotations

import pytest

from export.prompt_pieces import build_from_pieces, describe, prompt_pieces
from minicpm.checkpoint import Checkpoint
from minicpm.errors import UserError
from minicpm.tiny import TINY_MODELS
from tests.conftest import noise_image

MODELS = [m for m in TINY_MODELS if m.startswith("tiny-")]
SMALL, WIDE, TALL = noise_image(200, 150, 1), noise_image(640, 480, 2), noise_image(300, 900, 3)

FIRST_TURNS = {
    "text": [{"role": "user", "content": "What is in this image?"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": [SMALL, "Describe."]}],
    "one_sliced": [{"role": "user", "content": [TALL, "What is this?"]}],
    "two_images": [{"role": "user", "content": [WIDE, SMALL, "Compare the two."]}],
    "history": [{"role": "user", "content": [WIDE, "What is this?"]}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And its colour?"}],
    "history_reasoning": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "<think>\nthe user greets\n</think>\n\nHello!"},
                          {"role": "user", "content": [{"type": "text", "text": "Look:"}, TALL]}],
}
FOLLOW_UPS = {  # (messages, first_image) as Session.ask builds a later turn
    "turn_image": ([{"role": "user", "content": [WIDE, "And this one?"]}], 1),
    "turn_text": ([{"role": "user", "content": "Thanks."}], 2),
    "turn_system": ([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": [SMALL]}], 0),
}


@pytest.fixture(scope="module")
def checkpoints():
    return {name: Checkpoint.open(name) for name in MODELS}


@pytest.fixture(scope="module")
def pieces_of(checkpoints):
    """name -> prompt_pieces (derived and verified once per module)."""
    done = {}

    def get(name):
        if name not in done:
            done[name] = prompt_pieces(checkpoints[name])
        return done[name]

    return get


def _encode(ckpt):
    return lambda text: ckpt.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("name", MODELS)
def test_pieces_rebuild_every_conversation(checkpoints, pieces_of, name):
    ckpt = checkpoints[name]
    pieces = pieces_of(name)
    thinking_values = (False, True) if ckpt.config.variant.thinking else (False,)
    grids = set()
    for thinking in thinking_values:
        for case, messages in FIRST_TURNS.items():
            expected = ckpt.prompts.build(messages, enable_thinking=thinking)
            got = build_from_pieces(pieces, _encode(ckpt), describe(messages, expected.images), thinking)
            assert got[0] == expected.input_ids, (case, thinking)
            assert got[1] == expected.image_bounds, (case, thinking)
            assert got[2] == expected.text, (case, thinking)
            grids |= {im.sliced.grid for im in expected.images}
        for case, (messages, first) in FOLLOW_UPS.items():
            expected = ckpt.prompts.build_turn(messages, first, enable_thinking=thinking)
            got = build_from_pieces(pieces, _encode(ckpt), describe(messages, expected.images), thinking, first, True)
            assert got == (expected.input_ids, expected.image_bounds, expected.text), (case, thinking)
    assert None in grids and len(grids) >= 3  # unsliced and at least two slice layouts were covered


def test_thinking_changes_only_the_generation_prompt(pieces_of):
    for name in ("tiny-minicpm-v-4.5", "tiny-minicpm-o-4.5"):
        pieces = pieces_of(name)
        assert pieces["thinking"] is True
        assert pieces["generation"] == {"thinking": "<|im_start|>assistant\n",
                                        "no_thinking": "<|im_start|>assistant\n<think>\n\n</think>\n\n"}
    pieces = pieces_of("tiny-minicpm-v-4")
    assert pieces["thinking"] is False and pieces["generation"]["thinking"] == pieces["generation"]["no_thinking"]


def test_o45_pieces(pieces_of):
    pieces = pieces_of("tiny-minicpm-o-4.5")
    chatml = {role: {"header": f"<|im_start|>{role}\n", "footer": "<|im_end|>\n"}
              for role in ("system", "user", "assistant")}
    assert pieces["roles"] == chatml and pieces["prefix"] == pieces["default_system"] == ""
    assert pieces["image_tag"] == "<image>./</image>" and pieces["continuation"] == "<|im_end|>\n"
    assert pieces["dropped_ids"] == [151705]  # <|listen|>
    assert (pieces["span_start_ids"], pieces["span_end_ids"]) == ([151669, 151679], [151670, 151680])
    assert pieces["bos_ids"] == [] and pieces["eos_ids"] == []
    assert pieces["history_reasoning"] == {"close": "</think>"} and pieces["trailing_assistant"] is False
    assert pieces["non_query_user"] == {"prefix": "<tool_response>", "suffix": "</tool_response>"}
    assert pieces["placeholder"]["query_num"] == 64 and pieces["placeholder"]["use_image_id"] is True


def test_bos_and_default_system(checkpoints, pieces_of):
    v4 = pieces_of("tiny-minicpm-v-4")
    assert v4["bos_ids"] == [checkpoints["tiny-minicpm-v-4"].tokenizer.convert_tokens_to_ids("<s>")]
    assert v4["default_system"] == "" and v4["image_tag"] == "(<image>./</image>)"
    o26 = pieces_of("tiny-minicpm-o-2.6")
    assert o26["default_system"] == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    assert o26["bos_ids"] == [] and o26["trailing_assistant"] is True and o26["history_reasoning"] is None


def test_conversations_the_pieces_cannot_express_are_refused(checkpoints, pieces_of):
    ckpt = checkpoints["tiny-minicpm-o-4.5"]
    pieces = pieces_of("tiny-minicpm-o-4.5")
    trailing = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Hel"}]}]
    with pytest.raises(UserError, match="after the last user message"):
        build_from_pieces(pieces, _encode(ckpt), trailing)
    tool = [trailing[0], {"role": "assistant", "content": [{"type": "text", "text": "x</think>y"}]},
            {"role": "user", "content": [{"type": "text", "text": "<tool_response>1</tool_response>"}]}]
    with pytest.raises(UserError, match="after the last user message"):
        build_from_pieces(pieces, _encode(ckpt), tool)
    with pytest.raises(UserError, match="reserved image tag"):
        build_from_pieces(pieces, _encode(ckpt), [{"role": "user", "content": [
            {"type": "text", "text": "a <image>./</image> b"}]}])
    # ChatML without Qwen3's rules renders a trailing answer like any other
    v4 = checkpoints["tiny-minicpm-v-4"]
    expected = v4.prompts.build([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hel"}])
    assert build_from_pieces(pieces_of("tiny-minicpm-v-4"), _encode(v4), trailing)[0] == expected.input_ids


@pytest.mark.parametrize("template, where", [
    # the first user message gets another header than later ones: cutting the probes fails
    ("{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.first %}!{% endif %}\n{{ m.content }}<|im_end|>\n"
     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", "cannot be expressed"),
    # a fourth message is numbered: the pieces cut fine, the probe conversations then differ
    ("{% for m in messages %}<|im_start|>{{ m.role }}{% if loop.index0 == 3 %} 4{% endif %}\n{{ m.content }}"
     "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
     "probe 'late_system'"),
])
def test_templates_that_change_per_position_are_refused(template, where):
    ckpt = Checkpoint.open("tiny-minicpm-v-2.6")
    ckpt.tokenizer.chat_template = template
    with pytest.raises(UserError, match=where):
        prompt_pieces(ckpt)


def test_pieces_follow_the_manifest_schema(pieces_of):
    import jsonschema

    from runtime.manifest import SCHEMA

    assert "prompt" not in SCHEMA["required"]  # exports written before the section still validate
    for name in MODELS:
        jsonschema.validate(pieces_of(name), SCHEMA["properties"]["prompt"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**pieces_of("tiny-minicpm-v-4"), "version": 2}, SCHEMA["properties"]["prompt"])
