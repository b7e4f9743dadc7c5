"""Video files -> frames and temporal ids, as MiniCPM-V 4.5's model card (`encode_video`) makes them.

The recipe: uniform sampling of the decoded frames at a chosen fps, at most `max_frames` (180) frames per
packing step; a long video packs `ceil(duration * fps / max_frames)` consecutive frames into one group
(at most `max_packing`, card default 3, the 3D resampler takes up to 6), each group resampled into 64 tokens.
Temporal ids are frame timestamps snapped to the nearest point of a 0.1 s grid, in grid units. Frames are
RGB PIL images at their decoded size (the processor resizes them with `max_slice_nums=1`, no image ids).
Decoding uses PyAV (FFmpeg).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from minicpm.errors import UserError
from minicpm.image_processing import MAX_IMAGE_PIXELS

MAX_NUM_FRAMES = 180  # card: frames per packing step
MAX_NUM_PACKING = 3  # card default; the 3D resampler takes up to MAX_GROUP_FRAMES
MAX_GROUP_FRAMES = 6
TIME_SCALE = 0.1  # temporal ids count tenths of a second
DEFAULT_FPS = 3.0
MAX_SECONDS = 4 * 3600  # longer videos are refused before decoding
MAX_TOTAL_FRAMES = 1_000_000  # decoded frames, a bound on the decoding time


@dataclass
class SamplePlan:
    """Which decoded frames to keep and how they are grouped (pure arithmetic, testable without a file)."""

    indices: list[int]
    temporal_ids: list[list[int]]
    packing: int
    seconds: float

    @property
    def groups(self) -> int:
        return len(self.temporal_ids)


@dataclass
class Video:
    """Decoded frames and their temporal id groups; `content()` is the prompt's video item."""

    path: str
    frames: list[Image.Image]
    plan: SamplePlan
    video_fps: float
    total_frames: int
    size: tuple[int, int] = field(default=(0, 0))

    def content(self) -> dict:
        """{"type": "video", "frames": [...], "temporal_ids": [[...], ...]} (see minicpm.prompt.video_groups)."""
        return {"type": "video", "frames": self.frames, "temporal_ids": self.plan.temporal_ids}

    def summary(self) -> dict:
        return {"path": self.path, "seconds": round(self.plan.seconds, 3), "frames": len(self.frames),
                "groups": self.plan.groups, "temporal_ids": self.plan.temporal_ids}


def _check_options(fps: float, max_frames: int, max_packing: int) -> None:
    if not fps > 0 or not math.isfinite(fps):
        raise UserError(f"--fps must be a positive number, got {fps}")
    if max_frames < 1:
        raise UserError(f"--max-frames must be >= 1, got {max_frames}")
    if not 1 <= max_packing <= MAX_GROUP_FRAMES:
        raise UserError(f"--packing must be between 1 and {MAX_GROUP_FRAMES} (frames per group), got {max_packing}")


def nearest_ids(timestamps: np.ndarray, seconds: float) -> np.ndarray:
    """Timestamps snapped to the nearest point of arange(0, seconds, 0.1) (ties: the earlier), in 0.1 s units."""
    scale = np.arange(0, seconds, TIME_SCALE)
    if len(scale) == 0:
        scale = np.zeros(1)
    hi = np.clip(np.searchsorted(scale, timestamps), 0, len(scale) - 1)
    lo = np.clip(hi - 1, 0, len(scale) - 1)
    pick = np.where(np.abs(timestamps - scale[lo]) <= np.abs(scale[hi] - timestamps), lo, hi)
    return (scale[pick] / TIME_SCALE).astype(np.int32)


def sample_plan(total_frames: int, video_fps: float, fps: float = DEFAULT_FPS, max_frames: int = MAX_NUM_FRAMES,
                max_packing: int = MAX_NUM_PACKING) -> SamplePlan:
    """The card's frame count, packing, uniform indices and temporal id groups for a decoded video."""
    _check_options(fps, max_frames, max_packing)
    if total_frames < 1:
        raise UserError("the video has no frames")
    seconds = total_frames / video_fps
    if fps * int(seconds) <= max_frames:
        packing = 1
        count = round(min(fps, round(video_fps)) * min(max_frames, seconds))
    else:
        packing = math.ceil(seconds * fps / max_frames)
        if packing <= max_packing:
            count = round(seconds * fps)
        else:
            count, packing = max_frames * max_packing, max_packing
    count = max(count, 1)  # a clip shorter than one sampling step still gives its middle frame
    gap = total_frames / count
    indices = [int(i * gap + gap / 2) for i in range(count)]
    ids = nearest_ids(np.asarray(indices) / video_fps, seconds).tolist()
    groups = [ids[i:i + packing] for i in range(0, len(ids), packing)]
    return SamplePlan(indices, groups, packing, seconds)


def _open(path: str):
    import av  # noqa: PLC0415

    if not os.path.isfile(path):
        raise UserError(f"video not found: {path}")
    try:
        return av.open(path)
    except (av.FFmpegError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable video file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                        ) from None


def load_video(path: str | os.PathLike, fps: float = DEFAULT_FPS, max_frames: int = MAX_NUM_FRAMES,
               max_packing: int = MAX_NUM_PACKING) -> Video:
    """Decode `path` and sample it as the card's recipe does; bad files raise UserError in one line."""
    import av  # noqa: PLC0415

    path = str(path)
    _check_options(fps, max_frames, max_packing)
    with _open(path) as container:
        if not container.streams.video:
            kind = "audio-only" if container.streams.audio else "has no video stream"
            raise UserError(f"{path}: {kind} file, no video frames to read")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        codec = stream.codec_context  # None when the stream's codec cannot be opened (a damaged header)
        if codec is None:
            raise UserError(f"{path}: the video stream cannot be decoded (unknown or damaged codec header)")
        width, height = codec.width, codec.height
        if not video_fps > 0:
            raise UserError(f"{path}: the video stream has no frame rate")
        if width * height > MAX_IMAGE_PIXELS:
            raise UserError(f"{path}: frames of {width}x{height} are too large (at most {MAX_IMAGE_PIXELS} pixels)")
        declared = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else \
            (container.duration or 0) / 1e6
        if declared > MAX_SECONDS:
            raise UserError(f"{path}: the video lasts {declared:.0f} s, more than the {MAX_SECONDS} s limit")
        try:
            # Count frames by demuxing (no decoding): a container's own frame count is often absent or wrong.
            total = sum(1 for p in container.demux(stream) if p.size)
            if total / video_fps > MAX_SECONDS or total > MAX_TOTAL_FRAMES:
                raise UserError(f"{path}: the video lasts {total / video_fps:.0f} s ({total} frames), more than the "
                                f"{MAX_SECONDS} s limit")
            if total == 0:
                raise UserError(f"{path}: the video stream holds no frames")
            plan = sample_plan(total, video_fps, fps, max_frames, max_packing)
            wanted: dict[int, int] = {}
            for i in plan.indices:
                wanted[i] = wanted.get(i, 0) + 1
            container.seek(0, stream=stream)
            kept: dict[int, Image.Image] = {}
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    kept[n] = frame.to_image().convert("RGB")
                if n >= plan.indices[-1]:
                    break
        except UserError:
            raise
        except (av.FFmpegError, OSError, ValueError) as e:
            raise UserError(f"{path}: corrupt video ({str(e).splitlines()[0]})") from None
    if not kept:
        raise UserError(f"{path}: no frame could be decoded")
    # A stream that decodes fewer frames than it demuxes: the last decoded frame stands in (as a reader would).
    last = kept[max(kept)]
    frames = [kept.get(i, last) for i in plan.indices]
    return Video(path, frames, plan, video_fps, total, (width, height))


def add_video_arguments(parser, chat: bool = False) -> None:
    """`--video FILE [--fps N] [--max-frames N] [--packing N]` (runtime CLIs; chat: the options only)."""
    if not chat:
        parser.add_argument("--video", action="append", default=[], help="video file (repeatable; MiniCPM-V 4.5)")
    parser.add_argument("--fps", type=float, default=DEFAULT_FPS, help=f"video sampling fps (default {DEFAULT_FPS:g})")
    parser.add_argument("--max-frames", type=int, default=MAX_NUM_FRAMES,
                        help=f"frames per packing step before frames are packed (default {MAX_NUM_FRAMES})")
    parser.add_argument("--packing", type=int, default=MAX_NUM_PACKING,
                        help=f"at most this many frames per group, 1-{MAX_GROUP_FRAMES} (default {MAX_NUM_PACKING})")


def videos_from_args(args, paths=None) -> list[Video]:
    """The videos named on the command line, decoded with its sampling options."""
    return [load_video(p, args.fps, args.max_frames, args.packing) for p in (args.video if paths is None else paths)]
