"""`python -m quant.awq` and `python -m quant.report` as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from minicpm.checkpoint import load_model
from minicpm.errors import UserError
from quant import load_records
from quant.awq import main as awq_main
from quant.checkpoint import load_quantized
from quant.report import main as report_main
from runtime.cli import run
from tests.conftest import ROOT

FAST = ["--samples", "2", "--seq-len", "48", "--group-size", "64"]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=300)


def test_awq_cli_writes_a_loadable_checkpoint(tmp_path, tiny_path):
    out = tmp_path / "v4-awq"
    r = cli("quant.awq", "--model", "tiny-minicpm-v-4", "--out", str(out), *FAST, "--lm-head", "int8")
    assert r.returncode == 0, r.stderr
    assert "layers quantised (int4)" in r.stdout and "peak RSS" in r.stdout
    source = tiny_path("tiny-minicpm-v-4")
    names = {p.name for p in out.iterdir()}
    assert {p.name for p in source.iterdir()} | {"quant_records.safetensors", "quant_config.json"} == names
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the temporary directory is gone
    meta = json.loads((out / "quant_config.json").read_text())
    assert meta["method"] == "awq" and meta["quant_config"]["group_size"] == 64
    assert meta["summary"]["int4_layers"] == 14 and meta["summary"]["int8_layers"] == 1
    # As records: bit-exact. As a model: the plain loader runs the quantised weights; ours installs them.
    records, config = load_records(out / "quant_records.safetensors")
    loaded = load_quantized(out)
    plain, _ = load_model(out)
    x = torch.randn(1, 12, 256)
    with torch.no_grad():
        assert torch.allclose(plain.llm(inputs_embeds=x).logits, loaded.model.llm(inputs_embeds=x).logits, atol=1e-4)
    for name, record in records.items():
        assert torch.equal(loaded.model.get_submodule(name).weight, record.dequantize())
    assert config.lm_head == "int8" and records["llm.lm_head"].bits == 8


def test_awq_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    # What `python -m quant.awq` does (runtime.cli.run around main), in process to spare a 10 s interpreter start.
    monkeypatch.setattr(sys, "argv", ["quant.awq", "--model", "tiny-minicpm-v-4", "--out", str(tmp_path / "x"),
                                      "--group-size", "100"])
    with pytest.raises(SystemExit) as exit_info:
        run(awq_main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: group_size must be one of 32, 64, 128, got 100\n"
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    for args, message in [
        (["--out", str(tmp_path / "full")], "already exists and is not empty"),
        (["--out", str(tmp_path / "y"), "--calib", str(tmp_path / "none.jsonl")], "calibration file not found"),
        (["--out", str(tmp_path / "y"), "--method", "rtn", "--calib", "x.jsonl"], "--calib is used by --method awq"),
    ]:
        with pytest.raises(UserError, match=message):
            awq_main(["--model", "tiny-minicpm-v-4", *args])
    assert not (tmp_path / "y").exists()


def test_rtn_cli_overwrites(tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert awq_main(["--model", "tiny-minicpm-v-2.6", "--out", str(out), "--method", "rtn", "--overwrite",
                     "--group-size", "32", "--symmetric"]) == 0
    assert not (out / "stale.txt").exists()
    records, config = load_records(out / "quant_records.safetensors")
    assert config.symmetric and len(records) == 14 and all(bool((r.zeros == 8).all()) for r in records.values())


def test_report_cli(capsys):
    assert report_main(["--model", "tiny-minicpm-v-4", *FAST, "--heldout", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["methods"]) == ["awq", "rtn"]
    for method in report["methods"].values():
        assert method["kl"] >= 0 and 0 <= method["top1_agreement"] <= 1 and method["positions"] > 0
        assert len(method["layers"]) == 14
        assert all(0 < v["weight_error"] < 0.3 and 0 < v["output_error"] < 0.3 for v in method["layers"].values())
    assert report_main(["--model", "tiny-minicpm-v-4", *FAST, "--heldout", "1", "--quant", "rtn"]) == 0
    text = capsys.readouterr().out
    assert "KL(fp||q)" in text and "llm.model.layers.1.mlp.down_proj" in text
    with pytest.raises(UserError, match="--quant takes a comma-separated list of awq, rtn"):
        report_main(["--model", "tiny-minicpm-v-4", "--quant", "gptq"])
