"""Video files (MPEG-4 in MP4 and MKV, encoded here from synthetic frames): truncated, bit-flipped and poked
bytes, and odd sampling options, through minicpm.video.load_video."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import strategies as st

from tests.fuzz import Target


@functools.cache
def encoded(container: str, frames: int) -> bytes:
    import av  # noqa: PLC0415

    path = Path(tempfile.mkdtemp(prefix="fuzz-video-")) / f"v.{container}"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=5)
        s.width, s.height, s.pix_fmt = 32, 24, "yuv420p"
        for i in range(frames):
            frame = np.full((24, 32, 3), i * 20 % 256, np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path.read_bytes()


@st.composite
def video_case(draw) -> tuple[str, bytes, float, int, int]:
    container = draw(st.sampled_from(["mp4", "mkv"]))
    data = bytearray(encoded(container, draw(st.sampled_from([1, 3, 12]))))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(data) - 1))
        kind = draw(st.sampled_from(["truncate", "flip", "poke"]))
        if kind == "truncate":
            del data[at:]
            if not data:
                break
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        else:
            data[at] = draw(st.integers(0, 255))
    options = (draw(st.sampled_from([3.0, 0.5, 30.0, 0.0, -1.0, float("nan")])), draw(st.sampled_from([180, 1, 0])),
               draw(st.sampled_from([3, 1, 6, 7, 0])))
    return (container, bytes(data), *options)


def read_video(case) -> None:
    from minicpm.video import load_video  # noqa: PLC0415

    container, data, fps, max_frames, packing = case
    path = _scratch() / f"case.{container}"
    path.write_bytes(data)
    load_video(path, fps=fps, max_frames=max_frames, max_packing=packing)


@functools.cache
def _scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="fuzz-video-case-"))


TARGETS = [Target("video-files", video_case, read_video)]
