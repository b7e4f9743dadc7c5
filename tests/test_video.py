"""minicpm.video: the model card's frame sampling, packing and temporal ids, and the clear errors on bad files.
Test videos are encoded here with PyAV from synthetic frames."""

from __future__ import annotations

import numpy as np
import pytest

from minicpm.errors import UserError
from minicpm.video import load_video, sample_plan
from tests.conftest import encode_video as encode

av = pytest.importorskip("av")


# (total frames, video fps, choose fps, max_frames, max_packing) -> (indices head, count, packing, first group)
PLANS = [
    ((20, 10, 3, 180, 3), ([1, 5, 8], 6, 1, [1])),
    ((20, 10, 3, 2, 3), ([1, 5, 8], 6, 3, [1, 5, 8])),
    ((300, 30, 3, 180, 3), ([5, 15, 25], 30, 1, [2])),
    ((300, 30, 5, 180, 3), ([3, 9, 15], 50, 1, [1])),
    ((30, 30, 3, 180, 3), ([5, 15, 25], 3, 1, [2])),
    ((10, 25, 3, 180, 3), ([5], 1, 1, [2])),  # 0.4 s: round(1.2) = 1 frame
    ((7200, 24, 3, 180, 3), ([6, 20, 33], 540, 3, [2, 8, 14])),  # packing 5 > 3: capped, 180 * 3 frames
    ((7200, 24, 1, 180, 3), ([12, 36, 60], 300, 2, [5, 15])),
    ((18000, 30, 3, 180, 3), ([16, 50, 83], 540, 3, [5, 17, 28])),
    ((18000, 30, 3, 180, 6), ([8, 25, 41], 1080, 6, [3, 8, 14, 19, 25, 30])),
    ((120, 12, 24, 180, 3), ([0, 0, 1], 240, 2, [0, 0])),  # more frames than decoded: indices repeat
    ((1000, 10, 3, 90, 2), ([2, 8, 13], 180, 2, [2, 8])),
]


@pytest.mark.parametrize(("args", "expected"), PLANS)
def test_sample_plan_follows_the_card(args, expected):
    total, vfps, fps, max_frames, packing = args
    plan = sample_plan(total, vfps, fps, max_frames, packing)
    head, count, want_packing, first = expected
    assert plan.indices[:3] == head
    assert len(plan.indices) == count
    assert plan.packing == want_packing
    assert [len(g) for g in plan.temporal_ids[:-1]] == [want_packing] * (len(plan.temporal_ids) - 1)
    assert sum(len(g) for g in plan.temporal_ids) == count
    ids = [t for g in plan.temporal_ids for t in g]
    # nearest 0.1 s step, then the card's int32 cast of step / 0.1 (which can truncate 42.999... to 42)
    assert all(-1.5 - 1e-6 <= t - i / vfps * 10 <= 0.5 + 1e-6 for t, i in zip(ids, plan.indices, strict=True))
    if first is not None:
        assert plan.temporal_ids[0] == first


def test_load_video_frames_and_ids(tmp_path):
    video = load_video(encode(tmp_path / "a.mp4", 20, 10), max_frames=2)
    assert video.plan.indices == [1, 5, 8, 11, 15, 18]
    assert video.plan.temporal_ids == [[1, 5, 8], [11, 15, 18]]
    assert [f.mode for f in video.frames] == ["RGB"] * 6 and video.frames[0].size == (64, 48)
    red = [int(np.asarray(f)[..., 0].mean()) for f in video.frames]
    assert all(abs(r - i * 8) <= 6 for r, i in zip(red, video.plan.indices, strict=True))
    item = video.content()
    assert item["type"] == "video" and len(item["frames"]) == 6


def test_bad_videos_are_one_clear_line(tmp_path):
    with pytest.raises(UserError, match="video not found"):
        load_video(tmp_path / "missing.mp4")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"not a video at all" * 10)
    with pytest.raises(UserError, match="not a readable video"):
        load_video(junk)
    wav = tmp_path / "a.wav"
    with av.open(str(wav), "w") as c:
        s = c.add_stream("pcm_s16le", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        f.sample_rate = 8000
        for p in [*s.encode(f), *s.encode()]:
            c.mux(p)
    with pytest.raises(UserError, match="audio-only"):
        load_video(wav)
    with pytest.raises(UserError, match="--packing must be between 1 and 6"):
        load_video(encode(tmp_path / "b.mp4", 4, 10), max_packing=7)
    with pytest.raises(UserError, match="no frames"):
        sample_plan(0, 30)
