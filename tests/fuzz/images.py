"""Image files and bytes (every Pillow format we accept, truncated, bit-flipped, lying dimensions) and numpy
arrays (shapes, dtypes, NaN/inf) through load_image and the slicer."""

from __future__ import annotations

import functools
import io

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from tests.fuzz import Target

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO"]
MODES = ["RGB", "RGBA", "L", "P", "I;16", "CMYK", "1", "LA"]


@functools.cache
def encoded(fmt: str, mode: str, w: int, h: int) -> bytes:
    rng = np.random.RandomState(w * 31 + h)
    img = Image.fromarray((rng.rand(h, w, 3) * 255).astype(np.uint8)).convert(mode if mode != "I;16" else "I")
    buf = io.BytesIO()
    try:
        img.save(buf, fmt)
    except (OSError, ValueError, KeyError):  # this format does not store this mode
        img.convert("RGB").save(buf, fmt)
    return buf.getvalue()


@st.composite
def image_bytes(draw) -> bytes:
    data = bytearray(encoded(draw(st.sampled_from(FORMATS)), draw(st.sampled_from(MODES)),
                             draw(st.integers(1, 40)), draw(st.integers(1, 40))))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "poke", "dims"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "poke":
            data[at] = draw(st.integers(0, 255))
        else:  # a huge little- or big-endian number where a header may keep width or height
            data[at:at + 4] = draw(st.sampled_from([b"\xff\xff\x00\x00", b"\x00\x00\xff\xff", b"\x7f\xff\xff\xff"]))
    return bytes(data)


def read_image(value) -> None:
    from minicpm.image_processing import load_image, process_image  # noqa: PLC0415
    from minicpm.tiny import ensure_tiny  # noqa: PLC0415

    img = load_image(value)
    if img.width * img.height <= 2_000_000:  # slicing a giant accepted image is slow, not a fuzz finding
        process_image(img, _slice_config(str(ensure_tiny("tiny-minicpm-v-4"))))


@functools.cache
def _slice_config(path: str):
    from minicpm.config import MiniCPMConfig  # noqa: PLC0415

    return MiniCPMConfig.from_dir(path).slice


def arrays() -> st.SearchStrategy:
    dtypes = st.sampled_from([np.uint8, np.uint16, np.int32, np.int64, np.float16, np.float32, np.float64, np.bool_])
    shapes = st.one_of(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=24),
                       st.sampled_from([(8, 8, 3), (8, 8, 4), (8, 8, 1), (1, 1, 3), (0, 5, 3), (5, 5, 2)]))
    return dtypes.flatmap(lambda dt: hnp.arrays(dt, shapes, elements=_elements(dt)))


def _elements(dtype):
    if np.issubdtype(dtype, np.floating):
        return st.floats(allow_nan=True, allow_infinity=True, width=16 if dtype == np.float16 else 32)
    return None


TARGETS = [
    Target("image-bytes", image_bytes, read_image),
    Target("image-arrays", arrays, read_image),
]
