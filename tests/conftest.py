"""Shared fixtures: tiny checkpoints (built once per session into a private cache), test images, and the session's
export pool (tests/export_pool.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.export_pool import ROOT, Exports

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


@pytest.fixture(scope="session")
def hybrid():
    """hybrid(name) -> (HybridCheckpoint, model loaded by our strict loader) of MiniCPM-V 4.6 / 4.7, once per name."""
    from minicpm.v4_6 import HybridCheckpoint

    loaded = {}

    def get(name: str):
        if name not in loaded:
            ckpt = HybridCheckpoint.open(name)
            loaded[name] = (ckpt, ckpt.load_model("float32")[0])
        return loaded[name]

    return get


@pytest.fixture(scope="session")
def exports(tmp_path_factory, tiny_path):
    pool = Exports(tmp_path_factory.mktemp("exports"), tiny_path)
    yield pool
    pool.pool.shutdown(wait=True, cancel_futures=True)


V45_MAX_CONTEXT, V45_CHUNK = 1024, 64
V45_EXPORTS = {  # format -> extra exporter arguments: float weights, so the eager reference runs the same ones
    "onnx": [],
    "executorch": [],
    "coreai": ["--quant", "none", "--precision", "fp32"],
    "coreml": ["--quant", "int4-rtn"],  # structural only (Core ML runs on Apple platforms); AWQ's search: minutes
}


def v45_command(fmt: str) -> tuple[str, ...]:
    """The export command of the tiny V-4.5 in `fmt` (video tests, bundles), as `exports` takes it."""
    return (fmt, "tiny-minicpm-v-4.5", "--max-context", str(V45_MAX_CONTEXT), "--prefill-chunk", str(V45_CHUNK),
            *V45_EXPORTS[fmt])


@pytest.fixture(scope="session")
def v45_exports(exports):
    """format -> an export directory of the tiny V-4.5, through the session's export pool."""
    return lambda fmt: exports(*v45_command(fmt))


# Every test module may list the exports it will use as `EXPORTS_AHEAD` (tuples as `exports` takes them). They are
# all queued when the session starts, in collection order, so the two export processes never sit idle while the
# main process runs in-process tests: the suite then keeps both cores busy (measured: the pool used to start a
# module's exports only when that module began).
AHEAD = pytest.StashKey[list]()


def pytest_collection_finish(session):
    ahead, seen = [], set()
    for item in session.items:
        module = getattr(item, "module", None)
        if module is not None and module not in seen:
            seen.add(module)
            ahead += [tuple(cmd) for cmd in getattr(module, "EXPORTS_AHEAD", [])]  # Exports.start keys them
    session.config.stash[AHEAD] = ahead


@pytest.fixture(scope="session", autouse=True)
def exports_ahead(request, private_cache, exports):
    for command in request.config.stash.get(AHEAD, []):  # a Quantized model's build is queued just before it
        exports.start(*command)


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


def speechlike(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-like signal: a gliding harmonic tone under a syllable envelope, plus noise; the seed
    picks the pitch, the syllable rate and the noise."""
    rng = np.random.RandomState(seed)
    base, syllables = rng.uniform(90, 260), rng.uniform(2, 6)
    t = np.arange(round(seconds * rate)) / rate
    f0 = base * (1 + 0.25 * np.sin(2 * np.pi * 0.7 * t))
    phase = 2 * np.pi * np.cumsum(f0) / rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 6)) * np.sin(np.pi * syllables * t) ** 2
    return (0.3 * voice + 0.01 * rng.randn(t.size)).astype(np.float32)


def record_llm_calls(session) -> list[dict]:
    """Wrap `session.backend.llm`: every call's inputs (the arrays as passed) are appended to the returned list."""
    calls, llm = [], session.backend.llm

    def record(**inputs):
        calls.append(inputs)
        return llm(**inputs)

    session.backend.llm = record
    return calls
