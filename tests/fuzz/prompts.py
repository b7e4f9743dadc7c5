"""Chat messages and prompts: unknown roles, empty and odd content, control characters, many images."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import strategies as st
from PIL import Image

from tests.fuzz import Target

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.sampled_from(
    ["", "\x00", "\u202e", "<image>./</image>", "(<image>./</image>)", "<|im_end|>", "<unk>" * 5, "\r\n\t"])
IMAGE = Image.fromarray(np.full((3, 5, 3), 200, dtype=np.uint8))
ITEM = st.one_of(TEXT, st.just(IMAGE), st.builds(dict, type=st.sampled_from(["text", "image", "video", "audio", 3]),
                                                 text=TEXT), st.none(), st.integers(), st.just({"type": "video"}))
MESSAGE = st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]) | TEXT | st.none(),
    "content": TEXT | st.just(IMAGE) | st.lists(ITEM, max_size=5) | st.none() | st.integers(),
})
MESSAGES = st.lists(MESSAGE, max_size=4)  # thousands of images: one regular test (tests/test_robustness.py)


@functools.cache
def builder():
    from minicpm.checkpoint import Checkpoint  # noqa: PLC0415

    return Checkpoint.open("tiny-minicpm-o-4.5").prompts


def build(messages) -> None:
    b = builder()
    b.build(messages, max_slice_nums=2, enable_thinking=bool(len(messages) % 2))
    b.build_turn(messages, 3, max_slice_nums=1)


TARGETS = [Target("prompts", lambda: MESSAGES, build)]
