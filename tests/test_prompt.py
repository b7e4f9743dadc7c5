"""Token layouts pinned with the real MiniCPM-o 4.5 tokenizer (ids written out literally)."""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image

from minicpm.config import MiniCPMConfig
from minicpm.errors import UserError
from minicpm.prompt import PromptBuilder, SpecialTokens, load_tokenizer
from tests.conftest import REFERENCE_O45

IM_START, IM_END, NL, NL2 = 151644, 151645, 198, 271
USER, ASSISTANT, SYSTEM = 872, 77091, 8948
IMG, IMG_END, SLICE, SLICE_END, ID, ID_END, UNK = 151669, 151670, 151679, 151680, 151681, 151682, 128244
THINK, THINK_END = 151667, 151668
WHAT = [3838, 374, 419, 30]  # "What is this?"
NO_THINK = [THINK, NL2, THINK_END, NL2]  # enable_thinking=False -> empty think block
GEN = [IM_START, ASSISTANT, NL, *NO_THINK]


def image_span(index: int | None, grid: tuple[int, int] | None = None) -> list[int]:
    ids = [ID, 15 + index, ID_END] if index is not None else []
    ids += [IMG, *[UNK] * 64, IMG_END]
    if grid:
        cols, rows = grid
        for r in range(rows):
            ids += ([NL] if r else []) + [SLICE, *[UNK] * 64, SLICE_END] * cols
    return ids


@pytest.fixture(scope="module")
def builder():
    from minicpm.tiny import _tiny_configs

    tok = load_tokenizer(REFERENCE_O45)
    config = MiniCPMConfig.from_dict({**_tiny_configs()["tiny-minicpm-o-4.5"]})
    return PromptBuilder(tok, config, SpecialTokens.from_dir(REFERENCE_O45))


SMALL = Image.new("RGB", (200, 150))  # not sliced
WIDE = Image.new("RGB", (640, 480))  # grid 2 x 1
TALL = Image.new("RGB", (480, 640))  # grid 1 x 2


def test_one_image(builder):
    p = builder.build([{"role": "user", "content": [SMALL, "What is this?"]}])
    assert p.input_ids == [IM_START, USER, NL, *image_span(0), NL, *WHAT, IM_END, NL, *GEN]
    assert p.image_bounds == [(7, 71)]
    assert all(p.input_ids[i] == UNK for s, e in p.image_bounds for i in range(s, e))


def test_one_sliced_image(builder):
    p = builder.build([{"role": "user", "content": [TALL, "What is this?"]}])
    assert p.input_ids == [IM_START, USER, NL, *image_span(0, (1, 2)), NL, *WHAT, IM_END, NL, *GEN]
    # source, then slices row-major; a "\n" separates the slice rows
    assert p.image_bounds == [(7, 71), (73, 137), (140, 204)]
    assert p.tgt_sizes == [(37, 28), (26, 39), (26, 39)]  # (rows, cols) of 14-pixel patches


def test_two_images_with_and_without_ids(builder):
    msgs = [{"role": "user", "content": [SMALL, WIDE, "What is this?"]}]
    p = builder.build(msgs)
    assert p.input_ids == [IM_START, USER, NL, *image_span(0), NL, *image_span(1, (2, 1)), NL, *WHAT, IM_END, NL,
                           *GEN]
    assert len(p.image_bounds) == 1 + 1 + 2
    no_ids = PromptBuilder(builder.tokenizer, dataclasses.replace(builder.config, use_image_id=False))
    q = no_ids.build(msgs)
    assert q.input_ids == [IM_START, USER, NL, *image_span(None), NL, *image_span(None, (2, 1)), NL, *WHAT, IM_END,
                           NL, *GEN]


def test_multi_turn_and_system(builder):
    msgs = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": [SMALL, "What is this?"]},
        {"role": "assistant", "content": "A red house."},
        {"role": "user", "content": "Tell me more."},
    ]
    p = builder.build(msgs)
    assert p.input_ids == [
        IM_START, SYSTEM, NL, 2610, 525, 10950, 13, IM_END, NL,
        IM_START, USER, NL, *image_span(0), NL, *WHAT, IM_END, NL,
        IM_START, ASSISTANT, NL, 32, 2518, 3753, 13, IM_END, NL,
        IM_START, USER, NL, 40451, 752, 803, 13, IM_END, NL,
        *GEN,
    ]
    assert p.image_bounds == [(16, 80)]


def test_thinking_on_leaves_the_generation_prompt_open(builder):
    p = builder.build([{"role": "user", "content": "What is this?"}], enable_thinking=True)
    assert p.input_ids[-3:] == [IM_START, ASSISTANT, NL]


def test_image_ids_count_across_messages(builder):
    msgs = [{"role": "user", "content": [SMALL, "What is this?"]}, {"role": "assistant", "content": "A red house."},
            {"role": "user", "content": [SMALL, "What is this?"]}]
    ids = builder.build(msgs).input_ids
    assert [ids[i + 1] for i, t in enumerate(ids) if t == ID] == [15, 16]


def test_o45_tag_has_no_parentheses_and_other_variants_do(builder):
    text, _ = builder.render([{"role": "user", "content": [SMALL, "hi"]}])
    assert "<|im_start|>user\n<image>./</image>\nhi<|im_end|>" in text
    v4 = PromptBuilder(builder.tokenizer, dataclasses.replace(builder.config, variant=_variant("minicpm-v-4")))
    text, _ = v4.render([{"role": "user", "content": [SMALL, "hi"]}])
    assert "(<image>./</image>)\nhi" in text
    assert v4.build([{"role": "user", "content": [SMALL, "hi"]}]).input_ids.count(7) == 0  # no stray "("


def test_listen_tokens_are_dropped_for_o45(builder):
    ids = builder.build([{"role": "user", "content": "a<|listen|>b"}]).input_ids
    assert 151705 not in ids


def test_bad_messages(builder):
    with pytest.raises(UserError, match="role"):
        builder.build([{"role": "robot", "content": "hi"}])
    with pytest.raises(UserError, match="reserved image tag"):
        builder.build([{"role": "user", "content": "look <image>./</image>"}])
    with pytest.raises(UserError, match="no messages"):
        builder.build([])


def _variant(name):
    from minicpm.config import VARIANTS

    return next(v for v in VARIANTS if v.name == name)
