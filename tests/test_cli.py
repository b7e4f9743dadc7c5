"""The command-line tools as a user runs them: JSON shapes, agreement between tools, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)


def test_preprocess_json(images):
    r = cli("runtime.preprocess", "--model", "tiny-minicpm-o-4.5", "--image", str(images[0]), "--image",
            str(images[1]), "--prompt", "What is this?", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [im["grid"] for im in out["images"]] == [None, [2, 1]]
    assert out["images"][1] == {"original_size": [640, 480], "grid": [2, 1],
                                "slice_sizes": [[518, 392], [364, 546], [364, 546]],
                                "tgt_sizes": [[28, 37], [39, 26], [39, 26]]}
    assert len(out["image_bounds"]) == 4
    assert all(e - s == 64 for s, e in out["image_bounds"])
    assert out["input_ids"][:3] == [151644, 872, 198]


def test_generate_json_agrees_with_preprocess(images):
    common = ["--model", "tiny-minicpm-v-4", "--image", str(images[2]), "--prompt", "What is this?"]
    pre = json.loads(cli("runtime.preprocess", *common, "--max-slice-nums", "2", "--json").stdout)
    assert pre["images"][0]["grid"] == [1, 2]
    r = cli("runtime.generate", *common, "--max-slice-nums", "2", "--greedy", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) <= 8 and set(out) == {"token_ids", "text", "stats"}
    assert out["stats"]["prompt_tokens"] == len(pre["input_ids"])
    assert out["stats"]["slices"] == 3
    again = json.loads(cli("runtime.generate", *common, "--max-slice-nums", "2", "--max-new-tokens", "8",
                           "--json").stdout)
    assert again["token_ids"] == out["token_ids"]  # greedy is the default and deterministic


def test_generate_streams_text_and_prints_timings(images):
    r = cli("runtime.generate", "--model", "tiny-minicpm-o-4.5", "--image", str(images[0]), "--prompt", "hi",
            "--max-new-tokens", "4", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "20", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "vision" in r.stderr and "prefill" in r.stderr and "decode" in r.stderr


def test_errors_are_one_line(tmp_path, capsys):
    import pytest

    from runtime import generate, preprocess
    from runtime.cli import run

    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    cases = [
        (generate, "--model", "tiny-minicpm-v-4", "--image", str(bad), "--prompt", "x"),
        (preprocess, "--model", "no-such-model", "--prompt", "x"),
        (preprocess, "--model", "tiny-minicpm-v-4", "--image", str(tmp_path / "gone.jpg"), "--prompt", "x"),
        (generate, "--model", "tiny-minicpm-v-4", "--prompt", "x", "--greedy", "--temperature", "1"),
        (generate, "--model", "tiny-minicpm-v-4", "--prompt", "x", "--max-new-tokens", "0"),
        (generate, "--model", str(tmp_path), "--prompt", "x"),
        (generate, "--model", "tiny-minicpm-v-4", "--backend", "onnxruntime", "--prompt", "x"),
        (generate, "--artifacts", str(tmp_path), "--prompt", "x"),
    ]
    for module, *args in cases:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            run(lambda _argv, m=module, a=args: m.main(a))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, (args, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
