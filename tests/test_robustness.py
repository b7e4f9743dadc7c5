"""Hostile export directories as a new user meets them: one `error:` line on stderr and exit code 2, never a
traceback (issue 17's reported symptoms, plus the neighbours of each)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from minicpm.errors import UserError
from runtime.manifest import read_manifest
from runtime.session import Session
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, private_cache):
    out = tmp_path_factory.mktemp("robust") / "export"
    r = subprocess.run([sys.executable, "-m", "export.onnx", "--model", "tiny-minicpm-v-4", "--out", str(out),
                        "--max-context", "64", "--prefill-chunk", "16"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture
def copy(export_dir, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(export_dir, dst)
    return dst


def generate(directory) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runtime.generate", "--artifacts", str(directory), "--prompt", "Hi",
                           "--max-new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def assert_one_line(r: subprocess.CompletedProcess, pattern: str) -> None:
    import re  # noqa: PLC0415

    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_one_damaged_byte_in_the_manifest(copy):
    path = copy / "manifest.json"
    data = bytearray(path.read_bytes())
    data[40] = 0xFF  # not UTF-8: was a UnicodeDecodeError traceback
    path.write_bytes(bytes(data))
    assert_one_line(generate(copy), r"manifest.json: not UTF-8 text \(byte 40")


def test_a_10000_character_artifact_path(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"]["vision"]["path"] = "a" * 10_000  # was OSError: File name too long
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert_one_line(generate(copy), r"is not a valid artifact path")


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must be a JSON object, got list"),
    ("{" * 100_000, "invalid JSON"),
    ('{"schema_version": 1', "invalid JSON"),
])
def test_manifests_that_are_not_objects(copy, text, message):
    (copy / "manifest.json").write_text(text)
    with pytest.raises(UserError, match=message):
        read_manifest(copy)


def test_nul_byte_in_a_path(copy):
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"][0]["path"] = "config\u0000.json"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="not a valid artifact path"):
        read_manifest(copy)


def test_embedding_table_that_disagrees_with_the_manifest(copy):
    from runtime.manifest import sha256_file, write_manifest  # noqa: PLC0415

    manifest = json.loads((copy / "manifest.json").read_text())
    table = copy / "token_embedding.bin"
    table.write_bytes(table.read_bytes()[:-4])  # one float short, hash made to match: only the size check can tell
    manifest["artifacts"]["token_embedding"]["sha256"] = sha256_file(table)
    write_manifest(copy, manifest)
    with pytest.raises(UserError, match=r"does not hold the \[\d+, \d+\] float32 table"):
        Session(copy)
    del manifest["artifacts"]["token_embedding"]
    write_manifest(copy, manifest)
    with pytest.raises(UserError, match="lacks a token_embedding artifact"):
        Session(copy)


def test_bfloat16_table_halves_the_bytes_with_the_same_lookups(copy):
    """A table of bfloat16 numbers (a bf16 checkpoint) is written as bfloat16; the host's rows equal it exactly."""
    import numpy as np  # noqa: PLC0415
    import torch  # noqa: PLC0415

    from export.bundle import write_embedding_table  # noqa: PLC0415
    from runtime.manifest import write_manifest  # noqa: PLC0415
    from runtime.session import _embedding_table  # noqa: PLC0415

    manifest = json.loads((copy / "manifest.json").read_text())
    vocab, hidden = manifest["artifacts"]["token_embedding"]["shape"]
    table = torch.randn(vocab, hidden, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16).float()
    entry = write_embedding_table(None, copy, torch.float32, table)
    assert entry["dtype"] == "bfloat16" and entry["size"] == vocab * hidden * 2
    manifest["artifacts"]["token_embedding"] = entry
    write_manifest(copy, manifest)
    rows = [0, 5, vocab - 1]
    got = _embedding_table(copy, read_manifest(copy))[rows].astype(np.float32)
    np.testing.assert_array_equal(got, table[rows].numpy())
    table[3, 0] = 1.0 + 2.0**-10  # one value bfloat16 cannot hold: the export's own dtype
    assert write_embedding_table(None, copy, torch.float32, table)["dtype"] == "float32"


def test_hundreds_of_images_in_one_message(tiny):
    """500 images (a 33k-token prompt) are a long prompt, not a crash: every placeholder span is found, in order."""
    import numpy as np  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    ckpt, _ = tiny("tiny-minicpm-o-4.5")
    image = Image.fromarray(np.full((3, 5, 3), 200, dtype=np.uint8))
    prompt = ckpt.prompts.build([{"role": "user", "content": [image] * 500 + ["many"]}])
    assert len(prompt.image_bounds) == 500 and all(e - s == 64 for s, e in prompt.image_bounds)


@pytest.mark.parametrize("messages, message", [
    ([{"role": "system", "content": 1}], "message content must be text, an image or a list of items, got int"),
    (["hello"], "a message must be a dict with role and content, got str"),
    ([{"role": None, "content": "x"}], "unknown message role 'None'"),
    ([{"role": "system", "content": [{"type": "image", "text": ""}]}], "content item needs its 'image'"),
])
def test_malformed_messages(tiny, messages, message):
    """Minimal examples the prompts fuzz target found (an int content was a TypeError from list())."""
    ckpt, _ = tiny("tiny-minicpm-o-4.5")
    with pytest.raises(UserError, match=message):
        ckpt.prompts.build(messages)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["rope_scaling"].__setitem__("rope_theta", -9223372036854775809), "cannot build the model"),
    (lambda c: c.__setitem__("hidden_size", 2**40), "hidden_size must be an integer in 1..65536"),
    (lambda c: c.__setitem__("num_attention_heads", "4"), "not a valid MiniCPM config .*num_attention_heads"),
    (lambda c: c["rope_scaling"].__setitem__("factor", []), "cannot build the model"),
    (lambda c: c.clear() or c.update({"a": 1}), "model_type None is not a MiniCPM-V/o model"),
])
def test_hostile_config_json(tiny_path, tmp_path, edit, message):
    """Minimal examples the checkpoint-config fuzz target found: each was a traceback from transformers or torch."""
    from minicpm.checkpoint import Checkpoint  # noqa: PLC0415

    shutil.copytree(tiny_path("tiny-minicpm-v-4"), tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    edit(config)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=message):
        Checkpoint.open(tmp_path / "ckpt").load_model("float32")


def test_video_whose_codec_header_is_cut_off(tmp_path):
    """Minimal example of the video-files fuzz target: an MP4 cut right after its video handler has a stream
    whose codec context is None (was AttributeError: 'NoneType' object has no attribute 'width')."""
    from minicpm.video import load_video  # noqa: PLC0415
    from tests.fuzz.videos import encoded  # noqa: PLC0415

    data = encoded("mp4", 1)
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[:data.index(b"vide") + 4])
    with pytest.raises(UserError, match="cannot be decoded|not a readable video|corrupt video|no video"):
        load_video(path)
