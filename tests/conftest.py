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
