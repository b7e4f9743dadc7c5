"""The bench's measurements against the machine: bytes of weights per decode token, the device estimate, the
full-size checkpoint's writer (scaled down) and one small end-to-end bench run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import bench_machine

ROOT = Path(__file__).resolve().parents[1]
# The scaled-down full-size variant: real layout and depth (32 LLM layers), small widths.
SCALE = {"hidden_size": 128, "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 32, "vocab_size": 512,
         "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}}
# The scaled-down 4.6 / 4.7 full-size variant: the real 24-layer hybrid layout (every 4th layer full attention, tied
# head, window merger after vision layer 6), small widths.
HYBRID_SCALE = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 32, "vocab_size": 1024, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
                "linear_num_key_heads": 2, "linear_num_value_heads": 4,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e7, "partial_rotary_factor": 0.25,
                                    "mrope_section": [2, 1, 1], "mrope_interleaved": True},
                "vision": {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                           "num_hidden_layers": 8}}
EXPORTS_AHEAD = [("onnx", "tiny-minicpm-v-4", "--quant", "int4-rtn")]  # queued at session start
LLM_WEIGHT = re.compile(r"(\.(qweight|scales|qzeros)$|norm\.weight$|^llm\.lm_head\.)")


def test_onnx_bytes_per_token_is_the_llm_weights(exports):
    """On a tiny int4 export: the int4 codes, scales and zero points, the head and the norm weights of llm.onnx,
    counted here by name from the loaded initializers; no embedding table, no RoPE table, no vision graph."""
    import onnx
    from onnx import numpy_helper

    out = exports("onnx", "tiny-minicpm-v-4", "--quant", "int4-rtn")
    model = json.loads((out / "manifest.json").read_text())["model"]
    head = {(model["hidden_size"], model["vocab_size"]), (model["vocab_size"], model["hidden_size"])}
    graph = onnx.load(str(out / "llm.onnx")).graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    expected = sum(a.nbytes for name, a in arrays.items() if LLM_WEIGHT.search(name) or a.shape in head)
    assert sum(a.shape in head for a in arrays.values()) == 1  # the float head; the embedding table is the host's
    assert any(name.endswith(".qweight") for name in arrays)
    assert bench_machine.bytes_per_token(out) == expected
    assert expected < sum(a.nbytes for a in arrays.values())  # the RoPE tables are left out


def test_roofline_and_device_estimate_arithmetic():
    row = {"model": "m", "export": "e", "backend": "b", "bytes_per_token": 2_000_000_000, "decode_tok_s": 10.0}
    row.update(bench_machine.roofline(row, bandwidth_gbs=25.0))
    assert row["roofline_tok_s"] == 12.5 and row["roofline_pct"] == 80.0
    (est,) = bench_machine.device_estimates([row, {"model": "x", "decode_tok_s": 1.0}], 25.0)  # no bytes: none
    assert est["efficiency"] == 0.8
    assert est["predicted_tok_s"] == {"A17 Pro": 20.4, "A18 Pro": 24.0, "M1": 27.3, "M4": 48.0}
    # far below the roofline (a tiny model): the estimate keeps its precision, never rounds to 0
    (low,) = bench_machine.device_estimates([{**row, "bytes_per_token": 1_000_000, "decode_tok_s": 20.0}], 40.0)
    assert low["efficiency"] == 0.0005 and low["predicted_tok_s"]["M4"] == 60.0


def test_scaled_full_size_checkpoint_is_sharded_and_loads_strictly(tmp_path, monkeypatch):
    from minicpm import full_size
    from minicpm.checkpoint import checkpoint_files, load_model, resolve_model

    out = full_size.build_full_size("full-minicpm-v-4", tmp_path / "ckpt", scale=SCALE, shard_bytes=1_000_000,
                                    progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert [p.name for p in checkpoint_files(out)] == shards
    model, report = load_model(out, "bfloat16")  # strict: no missing, unexpected or mismatched key
    assert report.loaded == len(index["weight_map"]) == len(model.state_dict())
    assert model.llm.model.embed_tokens.weight.dtype == torch.bfloat16
    assert abs(model.llm.model.embed_tokens.weight.float().std().item() - full_size.STD) < 2e-3
    with torch.no_grad():  # numerically sane through all 32 layers in bfloat16
        logits = model.llm(input_ids=torch.randint(0, 400, (1, 32))).logits.float()
    assert len(model.llm.model.layers) == 32 and torch.isfinite(logits).all() and logits.abs().max() < 50
    assert full_size.build_full_size("full-minicpm-v-4", tmp_path / "again", scale=SCALE, shard_bytes=1_000_000,
                                     progress=False) and (tmp_path / "again" / shards[0]).read_bytes() == \
        (out / shards[0]).read_bytes()  # deterministic
    # the real one: V-4.0 shapes, 3.79 B parameters, resolved by name (built on first use; not here)
    cfg = full_size.full_config()
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"], cfg["vocab_size"]) == (2560, 32, 80, 73448)
    assert len(cfg["rope_scaling"]["long_factor"]) == 40
    assert round(full_size.parameter_count(cfg) / 1e9, 2) == 3.79
    monkeypatch.setattr(full_size, "ensure_full_size", lambda name: out)
    assert resolve_model("full-minicpm-v-4") == out


def test_scaled_hybrid_full_size_checkpoint_is_the_real_layout(tmp_path, monkeypatch):
    """full-minicpm-v-4.7 through the same code path at small widths: sharded, config.json of transformers' class,
    the tiny 4.7 tokenizer and processor, loaded strictly by the 4.6 / 4.7 loader (tied head not stored)."""
    from minicpm import full_size, full_size_hybrid
    from minicpm.checkpoint import resolve_model
    from minicpm.v4_6 import HybridCheckpoint

    out = full_size.build_full_size("full-minicpm-v-4.7", tmp_path / "ckpt", scale=HYBRID_SCALE,
                                    shard_bytes=200_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert "lm_head.weight" not in index["weight_map"]  # tied: the hub layout stores the embedding only
    ckpt = HybridCheckpoint.open(out)
    assert ckpt.variant.model_type == "minicpmv4_7" and ckpt.config.image_start_id is not None
    text = ckpt.config.text_config
    assert text.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 6 and text.tie_word_embeddings
    model, report = ckpt.load_model("bfloat16")  # strict: no missing, unexpected or mismatched key
    assert report.loaded == len(index["weight_map"])
    language = model.model.language_model
    assert model.lm_head.weight.data_ptr() == language.embed_tokens.weight.data_ptr()
    assert not language.norm.weight.any() and language.layers[0].linear_attn.norm.weight.eq(1).all()
    with torch.no_grad():  # numerically sane through all 24 layers in bfloat16
        logits = model(input_ids=torch.randint(0, 500, (1, 16))).logits.float()
    assert torch.isfinite(logits).all() and logits.abs().max() < 50
    assert ckpt.processor.tokenizer.decode([0]) is not None  # the tiny 4.7 tokenizer loads with the processor
    # the real one: 4.7-1B shapes, 1.30 B stored parameters (4.6 the same layout), resolved by name (not built here)
    cfg = full_size_hybrid.hybrid_config("minicpmv4_7")
    assert (cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, cfg.text_config.vocab_size,
            cfg.vision_config.num_hidden_layers) == (1024, 24, 248320, 27)
    assert round(full_size_hybrid.parameter_count("minicpmv4_7") / 1e9, 2) == 1.30
    assert full_size_hybrid.parameter_count("minicpmv4_6") == full_size_hybrid.parameter_count("minicpmv4_7")
    monkeypatch.setattr(full_size, "ensure_full_size", lambda name: out)
    assert resolve_model("full-minicpm-v-4.7") == out


def test_hybrid_models_get_only_their_exports(capsys):
    from runtime import bench

    jobs = bench.plan_jobs(["tiny-minicpm-v-4.6", "tiny-minicpm-v-4"], ["onnx", "executorch", "coreai"])
    assert jobs == [("tiny-minicpm-v-4.6", "onnx"), ("tiny-minicpm-v-4.6", "executorch"), ("tiny-minicpm-v-4", "onnx"),
                    ("tiny-minicpm-v-4", "executorch"), ("tiny-minicpm-v-4", "coreai")]
    assert "tiny-minicpm-v-4.6: skipping coreai" in capsys.readouterr().out
    assert set(bench.HYBRID_EXPORTS) <= set(bench.EXPORTS) and bench.HYBRID_FULL_MODEL == "full-minicpm-v-4.7"


@pytest.mark.slow
def test_bench_runs_end_to_end_with_machine_fields(tmp_path):
    cmd = [sys.executable, "-m", "runtime.bench", "--models", "tiny-minicpm-v-4", "--exports", "onnx-int4",
           "--new-tokens", "4", "--out", str(tmp_path)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "device estimate" in r.stdout and "DRAM read bandwidth" in r.stdout
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["machine"]["dram_read_gbs"] > 0 and bench["machine"]["cores"] >= 1
    (row,) = bench["rows"]
    for key in ("export_s", "export_peak_rss_mb", "export_mb", "bytes_per_token", "decode_tok_s", "roofline_pct",
                "prefill_tok_s", "prefill_prompt_tokens", "vision_ms_per_slice", "time_to_first_token_ms"):
        assert row[key] > 0, key
    assert 400 <= row["prefill_prompt_tokens"] <= 512 and row["slices"] >= 1
    assert 1 <= len(row["answer_ids"]) <= 4 and bench["int8_vision_agreement"] == []  # no int8-vision export here
    assert row["bytes_per_token"] == bench_machine.bytes_per_token(tmp_path / "tiny-minicpm-v-4-onnx-int4")
    log = (tmp_path / "tiny-minicpm-v-4-onnx-int4.export.log").read_text()  # the exporter's own summary table
    assert "llm.onnx" in log and "vision.onnx" in log
    (est,) = bench["device_estimates"]
    assert set(est["predicted_tok_s"]) == set(bench_machine.DEVICES)


def test_int8_vision_agreement_pairs_each_int8_row_with_its_float_twin(capsys):
    """The int8-vision row is compared with the row of the same model, backend and LLM weights whose export name
    lacks the suffix: leading greedy tokens that agree, and the vision parity its manifest reports."""
    from runtime import bench

    def row(export, backend, ids, parity=1e-6, model="m"):
        return {"model": model, "export": export, "backend": backend, "answer_ids": ids, "vision_parity": parity}

    rows = [row("onnx-int4-int8head", "onnxruntime", [5, 6, 7, 8]),
            row("onnx-int4-int8head-int8vis", "onnxruntime", [5, 6, 9, 8], 0.03),
            row("onnx-int4-int8head", "torch", [5, 6, 7, 8]),  # another backend: no int8 twin
            row("executorch-8da4w-int8head-int8vis", "executorch", [1, 2]),  # no float twin in the rows
            row("onnx-int4-int8head-int8vis", "onnxruntime", [5, 6, 7, 8], 0.02, model="n"),
            row("onnx-int4-int8head", "onnxruntime", [5, 6, 7, 8], model="n")]
    assert bench.int8_vision_agreement(rows) == [
        {"model": "m", "export": "onnx-int4-int8head-int8vis", "backend": "onnxruntime",
         "against": "onnx-int4-int8head", "tokens_agree": 2, "tokens": 4, "identical": False, "vision_parity": 0.03},
        {"model": "n", "export": "onnx-int4-int8head-int8vis", "backend": "onnxruntime",
         "against": "onnx-int4-int8head", "tokens_agree": 4, "tokens": 4, "identical": True, "vision_parity": 0.02}]
    short = bench.int8_vision_agreement([row("x", "b", [1, 2, 3]), row("x-int8vis", "b", [1, 2])])
    assert (short[0]["tokens_agree"], short[0]["tokens"], short[0]["identical"]) == (2, 3, False)


def test_llama_cpp_row_and_export_only_rows(tmp_path, capsys):
    """--llama-bench: llama-bench's JSON becomes a row measured like ours (its prompt / new tokens / threads passed
    through); a Core ML export on Linux is a row of export figures only, printed with "-" where nothing ran."""
    from runtime import bench

    fake = tmp_path / "llama-bench"
    fake.write_text(f"#!{sys.executable}\nimport json, sys\na = sys.argv\n"
                    "p, n, t = int(a[a.index('-p') + 1]), int(a[a.index('-n') + 1]), int(a[a.index('-t') + 1])\n"
                    "base = {'build_commit': 'abc1234', 'model_type': 'llama 8B Q4_0', 'model_size': 1926924320}\n"
                    "print(json.dumps([{**base, 'n_prompt': p, 'n_gen': 0, 'avg_ts': 60.5 + t},\n"
                    "                  {**base, 'n_prompt': 0, 'n_gen': n, 'avg_ts': 13.25}]))\n")
    fake.chmod(0o755)
    gguf = tmp_path / "llm-q4_0.gguf"
    gguf.write_bytes(b"\0" * 2**20)
    args = bench.argparse.Namespace(prefill_tokens=512, new_tokens=64)
    row = bench.llama_cpp_row(str(fake), str(gguf), args)
    assert row["prefill_tok_s"] == 60.5 + bench_machine.backend_threads() and row["decode_tok_s"] == 13.25
    assert row["prefill_prompt_tokens"] == 512 and row["bytes_per_token"] == 1926924320
    assert (row["export"], row["backend"], row["export_mb"]) == ("llama.cpp Q4_0", "llama.cpp abc1234", 1.0)
    assert bench_machine.roofline(row, 50.0)["roofline_pct"] == round(100 * 13.25 * 1926924320 / 50e9, 2)
    export_only = {"model": "full-minicpm-v-4", "export": "coreml-int4-int8head", "backend": "-", "export_s": 612.3,
                   "export_peak_rss_mb": 8100.0, "export_mb": 2000.0, "bytes_per_token": 1.7e9}
    assert bench_machine.roofline(export_only, 50.0) == {} and bench_machine.device_estimates([export_only], 50) == []
    facts = {"dram_read_gbs": 50.0, "dram_read_gbs_before": 50.0, "dram_read_gbs_after": 49.0, "cpu_model": "x",
             "cores": 2, "threads_used": 2, "memory_gb": 24, "isa": []}
    bench.print_tables([row, export_only], bench_machine.device_estimates([row], 50.0), facts, 512)
    lines = capsys.readouterr().out.splitlines()
    (coreml,) = [line for line in lines if line.startswith("full-minicpm-v-4    coreml")][:1]
    assert coreml.split()[3:7] == ["612.3s", "8100", "2000.0", "1700.0"] and coreml.split()[7:] == ["-"] * 7
    with pytest.raises(bench.StepFailed, match="llama-bench"):
        bench.llama_cpp_row(str(tmp_path / "llama-bench-missing"), str(gguf), args)
