"""Shared fixtures: tiny checkpoints (built once per session into a private cache) and test images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_O45 = ROOT / "minicpm" / "assets" / "minicpm-o-4_5"  # the real MiniCPM-o 4.5 tokenizer files


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Tiny checkpoints go to a fresh cache so tests never depend on (or touch) the user's."""
    os.environ["MINICPM_CACHE"] = str(tmp_path_factory.mktemp("minicpm-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing in the tests may reach a hub
    yield


@pytest.fixture(scope="session")
def tiny_path():
    from minicpm.tiny import ensure_tiny

    return ensure_tiny


@pytest.fixture(scope="session")
def tiny():
    """tiny(name) -> (Checkpoint, model), loaded once per name."""
    from minicpm.checkpoint import Checkpoint

    loaded = {}

    def get(name: str):
        if name not in loaded:
            ckpt = Checkpoint.open(name)
            loaded[name] = (ckpt, ckpt.load_model("float32")[0])
        return loaded[name]

    return get


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype(np.uint8))


@pytest.fixture
def images(tmp_path):
    """Three test images on disk: small (not sliced), 640x480 (2x1 grid), tall 300x900 (sliced)."""
    paths = []
    for i, (w, h) in enumerate([(200, 150), (640, 480), (300, 900)]):
        p = tmp_path / f"img{i}.png"
        noise_image(w, h, seed=i).save(p)
        paths.append(p)
    return paths


def encode_video(path, frames: int, fps: int, width: int = 64, height: int = 48, seed: int = 0) -> str:
    """An MPEG-4 test video encoded with PyAV: frame i's red channel is i * 8 (mod 256), plus seeded noise in
    the other channels when `seed` is set (so two videos of one length differ in content)."""
    import av  # noqa: PLC0415

    rng = np.random.RandomState(seed)
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            a = np.zeros((height, width, 3), np.uint8)
            if seed:
                a[..., 1:] = rng.randint(0, 255, (height, width, 2))
            a[..., 0] = i * 8 % 256
            for p in s.encode(av.VideoFrame.from_ndarray(a, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return str(path)
