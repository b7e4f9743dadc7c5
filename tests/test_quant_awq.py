"""AWQ: folding preserves the full-precision function, the search beats RTN where AWQ should, any model works."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, WhisperConfig
from transformers.cache_utils import Cache
from transformers.models.idefics2.configuration_idefics2 import Idefics2VisionConfig
from transformers.models.idefics2.modeling_idefics2 import Idefics2Encoder
from transformers.models.whisper.modeling_whisper import WhisperEncoder

from minicpm.errors import UserError
from quant import QuantConfig, awq_quantize, layout, rtn_quantize
from quant.calibration import build_calibration, read_jsonl
from quant.capture import capture_inputs, run_block, runner
from quant.layout import known_layout
from quant.scaling import InputScaledLinear, apply_scale
from tests.conftest import noise_image


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: OpenMP threads cost more than they bring (and suffer badly on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def randomise_norms(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial norm weights and biases, so folding into them is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name.lower():
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn(p.shape, generator=g))


def fold_random_scales(layers: nn.ModuleList, seed: int = 0) -> list[list[str]]:
    """Apply a random AWQ scale (0.25x..4x per channel) to every scale group; return the kinds used."""
    g = torch.Generator().manual_seed(seed)
    kinds = []
    for layer in layers:
        _, groups = known_layout(layer)
        kinds.append([group.kind for group in groups])
        for group in groups:
            if group.kind != "none":
                width = layer.get_submodule(group.linears[0]).in_features
                apply_scale(layer, group, 4.0 ** (2 * torch.rand(width, generator=g) - 1))
    return kinds


def tiny_llama(kv_heads: int = 4) -> LlamaModel:
    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, attention_bias=True)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    randomise_norms(model)
    return model


def tiny_whisper() -> WhisperEncoder:
    config = WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128,
                           num_mel_bins=16, max_source_positions=32)
    torch.manual_seed(0)
    model = WhisperEncoder(config).eval()
    randomise_norms(model)
    return model


# ---------------------------------------------------------------------------------------------------------
# Folding keeps the full-precision function
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_folding_llama_block_is_exact():
    model = tiny_llama()
    ids = torch.randint(0, 100, (2, 12))
    expected = model(input_ids=ids).last_hidden_state
    kinds = fold_random_scales(model.layers)
    assert kinds[0] == ["norm", "linear", "norm", "linear"]  # no explicit scales anywhere in a Llama block
    assert relative(model(input_ids=ids).last_hidden_state, expected) <= 1e-5


@torch.no_grad()
def test_folding_skips_o_proj_under_gqa():
    model = tiny_llama(kv_heads=2)
    ids = torch.randint(0, 100, (1, 10))
    expected = model(input_ids=ids).last_hidden_state
    kinds = fold_random_scales(model.layers)
    assert kinds[0] == ["norm", "none", "norm", "linear"]  # v_proj (32 outputs) cannot feed o_proj's 64 inputs
    assert relative(model(input_ids=ids).last_hidden_state, expected) <= 1e-5


@torch.no_grad()
def test_folding_whisper_block_with_explicit_input_scale_is_exact():
    model = tiny_whisper()
    features = torch.randn(2, 16, 64)
    expected = model(features).last_hidden_state
    kinds = fold_random_scales(model.layers)
    assert kinds[0] == ["norm", "linear", "norm", "explicit"]  # GELU sits between fc1 and fc2
    assert isinstance(model.layers[0].fc2, InputScaledLinear) and model.layers[0].fc2.input_scale.shape == (128,)
    assert set(model.state_dict()) == set(tiny_whisper().state_dict())  # parameter names unchanged
    assert relative(model(features).last_hidden_state, expected) <= 1e-5


@torch.no_grad()
def test_folding_siglip_block_with_explicit_input_scale_is_exact():
    config = Idefics2VisionConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    encoder = Idefics2Encoder(config).eval()
    randomise_norms(encoder)
    x = torch.randn(2, 20, 64)
    expected = encoder(inputs_embeds=x).last_hidden_state
    kinds = fold_random_scales(encoder.layers)
    assert kinds[0] == ["norm", "linear", "norm", "explicit"]
    assert relative(encoder(inputs_embeds=x).last_hidden_state, expected) <= 1e-5


# ---------------------------------------------------------------------------------------------------------
# AWQ beats RTN where it should
# ---------------------------------------------------------------------------------------------------------


def salient_inputs(samples: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 64, 256, generator=g)
    x[..., [3, 70, 141, 200]] *= 50  # four salient input channels (1.6 %), as in LLM activations
    return x


@torch.no_grad()
def test_awq_halves_output_error_on_salient_channels():
    torch.manual_seed(0)
    layer = nn.Linear(256, 256)
    config = QuantConfig(group_size=64)
    awq = awq_quantize(copy.deepcopy(layer), list(salient_inputs(4, seed=1).split(1)), config)
    rtn = rtn_quantize(copy.deepcopy(layer), config)
    held_out = salient_inputs(4, seed=2)
    expected = layer(held_out)
    awq_error, rtn_error = relative(awq.model(held_out), expected), relative(rtn.model(held_out), expected)
    assert awq_error <= 0.5 * rtn_error, (awq_error, rtn_error)
    assert awq.records[""].input_scale is not None  # a bare Linear has nothing before it to absorb the scale
    layer_report = awq.report["layers"][""]
    assert layer_report["scale"] == "explicit input scale" and layer_report["alpha"] is not None


def plant_outliers(model: nn.Module, factor: float = 25.0, channels: int = 8) -> None:
    """Activation-outlier channels the full-precision model does not notice: norm weights x factor with the
    consuming weight columns / factor, and up_proj rows x factor with down_proj columns / factor."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for layer in model.llm.model.layers:
            hidden = layer.input_layernorm.weight.shape[0]
            for norm, linears in ((layer.input_layernorm, ("q_proj", "k_proj", "v_proj")),
                                  (layer.post_attention_layernorm, ("gate_proj", "up_proj"))):
                idx = torch.randperm(hidden, generator=g)[:channels]
                norm.weight[idx] *= factor
                parent = layer.self_attn if "q_proj" in linears else layer.mlp
                for name in linears:
                    getattr(parent, name).weight[:, idx] /= factor
            idx = torch.randperm(layer.mlp.up_proj.out_features, generator=g)[:channels]
            layer.mlp.up_proj.weight[idx] *= factor
            layer.mlp.down_proj.weight[:, idx] /= factor


@torch.no_grad()
def mean_kl(reference: nn.Module, quantized: nn.Module, items: list[dict]) -> float:
    total, positions = 0.0, 0
    for item in items:
        p = torch.log_softmax(reference.llm(**item).logits[0], -1)
        q = torch.log_softmax(quantized.llm(**item).logits[0], -1)
        total += float((p.exp() * (p - q)).sum())
        positions += p.shape[0]
    return total / positions


def test_awq_beats_rtn_on_tiny_checkpoint_with_outliers(tiny):
    ckpt, original = tiny("tiny-minicpm-v-4")
    fp = copy.deepcopy(original)
    plant_outliers(fp)
    calibration = build_calibration(ckpt, fp, samples=6, seq_len=96)
    held_out = build_calibration(ckpt, fp, samples=4, seq_len=96, heldout=True)
    x = held_out[0]["inputs_embeds"]
    assert torch.allclose(fp.llm(inputs_embeds=x).logits, original.llm(inputs_embeds=x).logits, atol=1e-3)
    config = QuantConfig(group_size=64)
    awq = awq_quantize(copy.deepcopy(fp), calibration, config)
    rtn = rtn_quantize(copy.deepcopy(fp), config)
    awq_kl, rtn_kl = mean_kl(fp, awq.model, held_out), mean_kl(fp, rtn.model, held_out)
    assert awq_kl < 0.5 * rtn_kl, (awq_kl, rtn_kl)  # measured: 0.038 vs 0.287
    assert awq.report["layouts"] == {"llm.model.layers": ["llama/qwen2/qwen3 decoder"]}
    assert len(awq.records) == 14 and all(n.startswith("llm.model.layers.") for n in awq.records)  # vision kept
    assert "under GQA" not in json.dumps(awq.report) and "GQA" in awq.report["layers"][
        "llm.model.layers.0.self_attn.o_proj"]["scale"]
    for name, record in awq.records.items():  # the fake-quant model holds exactly the records' weights
        assert torch.equal(awq.model.get_submodule(name).weight, record.dequantize())


@torch.no_grad()
def test_block_replays_are_stateless(tiny):
    """A replayed block must see its current weights: a KV cache left in the captured arguments would grow on
    every replay and serve the first replay's keys and values to every later trial."""
    _, model = tiny("tiny-minicpm-v-4")
    block = model.llm.model.layers[0]
    x = torch.randn(1, 24, model.llm.config.hidden_size, generator=torch.Generator().manual_seed(0))
    run, items = runner(model, "llm.model.layers", [{"inputs_embeds": x}])
    inp = capture_inputs(run, items, block, "llm.model.layers", torch.device("cpu"))[0]
    assert not any(isinstance(v, Cache) for v in inp.kwargs.values())
    first = run_block(block, inp)
    assert torch.equal(run_block(block, inp), first)
    original = {n: block.get_submodule(n).weight.clone() for n in ("self_attn.k_proj", "self_attn.v_proj")}
    try:
        for name in original:  # change only what the keys and values are made of
            block.get_submodule(name).weight.mul_(0.5)
        changed = run_block(block, inp)
        full = model.llm.model(inputs_embeds=x, output_hidden_states=True, use_cache=False).hidden_states[1]
    finally:
        for name, w in original.items():
            block.get_submodule(name).weight.copy_(w)
    assert torch.allclose(changed, full, atol=1e-5) and not torch.allclose(changed, first, atol=1e-3)


def test_branch_search_gives_the_block_search_records(tiny, monkeypatch):
    """The MLP groups search on the MLP alone (cheaper, same error as the block output); the records must be
    those of the whole-block search, and a branch that is not the block's last is caught and run as the block."""
    ckpt, model = tiny("tiny-minicpm-v-4")
    calibration = build_calibration(ckpt, model, samples=4, seq_len=64)
    config = QuantConfig(group_size=64)

    def run() -> tuple[dict, dict]:
        result = awq_quantize(copy.deepcopy(model), calibration, config)
        layer = "llm.model.layers.1."
        searched = {n: result.report["layers"][layer + n].get("searched_on")
                    for n in ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        return result.records, searched

    fast, searched = run()
    assert searched == {"self_attn.q_proj": "block", "mlp.gate_proj": "mlp", "mlp.up_proj": "mlp",
                        "mlp.down_proj": "mlp.down_proj"}
    monkeypatch.setattr(layout, "LAST_BRANCH", {})
    slow, searched = run()
    assert set(searched.values()) == {"block"}
    # attention is not the last branch (the MLP reads its output): the RTN-trial check must keep the block
    monkeypatch.setattr(layout, "LAST_BRANCH", {"llama/qwen2/qwen3 decoder": {"self_attn.q_proj": "self_attn"}})
    guarded, searched = run()
    assert set(searched.values()) == {"block"}
    assert fast.keys() == slow.keys() == guarded.keys()
    for name in slow:
        for field in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(fast[name], field), getattr(slow[name], field)), (name, field)
            assert torch.equal(getattr(guarded[name], field), getattr(slow[name], field)), (name, field)


# ---------------------------------------------------------------------------------------------------------
# Any model with Linears
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_bert_model():
    config = BertConfig(vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=32)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    calibration = [{"input_ids": torch.randint(1, 99, (1, 16))} for _ in range(3)]
    ids = torch.randint(1, 99, (2, 16))
    expected = model(input_ids=ids).last_hidden_state
    result = awq_quantize(model, calibration, QuantConfig(group_size=32))
    assert result.report["layouts"] == {"encoder.layer": ["bert"]}
    assert result.report["kept"]["pooler.dense"] == "outside the transformer blocks"
    assert len(result.records) == 12
    explicit = sorted(n.split("layer.0.")[1] for n, r in result.records.items()
                      if n.startswith("encoder.layer.0.") and r.input_scale is not None)
    # Post-norm BERT: only value -> attention.output.dense folds for free.
    assert explicit == ["attention.self.key", "attention.self.query", "attention.self.value", "intermediate.dense",
                        "output.dense"]
    assert relative(result.model(input_ids=ids).last_hidden_state, expected) < 0.1


@torch.no_grad()
def test_whisper_encoder_with_tensor_calibration():
    model = tiny_whisper()
    features = torch.randn(3, 16, 64)
    expected = model(features).last_hidden_state
    result = awq_quantize(model, [f[None] for f in features], QuantConfig(group_size=32, symmetric=True))
    assert result.report["layouts"] == {"layers": ["whisper encoder"]}
    assert result.records["layers.1.fc2"].input_scale is not None
    assert result.records["layers.1.self_attn.out_proj"].input_scale is None  # folded into v_proj's rows
    assert result.report["layers"]["layers.1.self_attn.out_proj"]["scale"] in (
        "folded into self_attn.v_proj", "not scaled (plain rounding scored best)")
    assert all(bool((r.zeros == 8).all()) for r in result.records.values())
    assert relative(model(features).last_hidden_state, expected) < 0.1


class Gated(nn.Module):
    """A block no table knows: a and b read the same input, c reads their gated product."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(64, 128), nn.Linear(64, 128), nn.Linear(128, 64)

    def forward(self, x):
        return x + self.c(torch.relu(self.a(x)) * self.b(x))


@torch.no_grad()
def test_unknown_blocks_get_shared_explicit_scales():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), nn.ModuleList([Gated(), Gated()]))
    model.forward = lambda x: model[1][1](model[1][0](model[0](x)))  # a ModuleList is not callable
    fresh = copy.deepcopy(model)
    x = torch.randn(1, 10, 8)
    result = awq_quantize(model, [torch.randn(1, 10, 8) for _ in range(2)], QuantConfig(group_size=32))
    assert result.report["layouts"] == {"1": ["generic (explicit input scales)"]}
    assert sorted(result.records) == ["1.0.a", "1.0.b", "1.0.c", "1.1.a", "1.1.b", "1.1.c"]
    assert torch.equal(result.records["1.0.a"].input_scale, result.records["1.0.b"].input_scale)  # one group
    assert result.report["kept"]["0"] == "outside the transformer blocks"
    assert relative(model(x), fresh(x)) < 0.1
    kept = rtn_quantize(fresh, QuantConfig(group_size=128)).report["kept"]
    assert kept["1.0.a"] == "in_features 64 is not a multiple of group_size 128" and "1.0.c" not in kept


def test_quantize_vision_on_minicpmv(tiny):
    ckpt, original = tiny("tiny-minicpm-v-4")
    model = copy.deepcopy(original)
    config = QuantConfig(group_size=64, quantize_vision=True, alpha_grid=4, clip_grid=4)
    calibration = build_calibration(ckpt, model, samples=2, seq_len=64, vision=True)
    assert any("pixel_values" in item for item in calibration)
    result = awq_quantize(model, calibration, config)
    assert result.report["blocks"] == ["vpm.encoder.layers", "llm.model.layers"]
    assert result.report["layouts"]["vpm.encoder.layers"] == ["siglip/idefics2 encoder"]
    assert result.records["vpm.encoder.layers.2.mlp.fc2"].input_scale is not None
    assert result.report["kept"]["resampler.kv_proj"] == "outside the transformer blocks"
    with pytest.raises(UserError, match="quantize_vision=True needs image calibration samples"):
        awq_quantize(copy.deepcopy(original), [{"inputs_embeds": torch.randn(1, 8, 256)}], config)


# ---------------------------------------------------------------------------------------------------------
# Clear errors
# ---------------------------------------------------------------------------------------------------------


class LlamaNamedButNot(nn.Module):
    """Llama's module names, but a GELU between v_proj and o_proj: folding v -> o would change the output."""

    def __init__(self):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(32), nn.LayerNorm(32)
        self.self_attn = nn.ModuleDict({n: nn.Linear(32, 32) for n in ("q_proj", "k_proj", "v_proj", "o_proj")})
        self.mlp = nn.ModuleDict({"gate_proj": nn.Linear(32, 64), "up_proj": nn.Linear(32, 64),
                                  "down_proj": nn.Linear(64, 32)})

    def forward(self, x):
        a, m = self.self_attn, self.mlp
        h = self.input_layernorm(x)
        x = x + a.o_proj(nn.functional.gelu(a.v_proj(h))) + a.q_proj(h) * a.k_proj(h)
        h = self.post_attention_layernorm(x)
        return x + m.down_proj(torch.relu(m.gate_proj(h)) * m.up_proj(h))


def test_errors_are_clear():
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    with pytest.raises(UserError, match="empty calibration"):
        awq_quantize(layer, [], QuantConfig(group_size=32))
    with pytest.raises(UserError, match="not a single Tensor"):
        awq_quantize(layer, torch.randn(2, 64), QuantConfig(group_size=32))
    with pytest.raises(UserError, match="has no Linear layers"):
        rtn_quantize(nn.Sequential(nn.ReLU()), QuantConfig())
    with pytest.raises(UserError, match="nothing to quantise.*skip pattern"):
        rtn_quantize(nn.Sequential(nn.Linear(64, 64)), QuantConfig(group_size=32, skip=["."]))
    with pytest.raises(UserError, match="blocks: Linear has no submodule 'layers'"):
        awq_quantize(layer, [torch.randn(1, 64)], QuantConfig(group_size=32, blocks="layers"))
    stack = nn.ModuleList([LlamaNamedButNot()])
    stack.forward = lambda x: stack[0](x)
    with pytest.raises(UserError, match=r"unsupported layout in 0 \(LlamaNamedButNot\)"):
        awq_quantize(stack, [torch.randn(1, 6, 32)], QuantConfig(group_size=32))


def test_calibration_not_reaching_the_blocks(tiny):
    _, original = tiny("tiny-minicpm-v-4")

    class Shortcut(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(32, 32), nn.Linear(32, 32)])

        def forward(self, x, skip=False):
            return x if skip else self.layers[1](self.layers[0](x))

    with pytest.raises(UserError, match="calibration sample 1 ran the model to the end without reaching layers"):
        awq_quantize(Shortcut(), [(torch.randn(1, 32),), (torch.randn(1, 32), True)], QuantConfig(group_size=32))


def test_calibration_jsonl(tmp_path, tiny):
    ckpt, model = tiny("tiny-minicpm-v-4")
    noise_image(300, 200).save(tmp_path / "a.png")
    data = tmp_path / "calib.jsonl"
    data.write_text(json.dumps({"images": ["a.png"], "messages": [{"role": "user", "content": "What is this?"},
                                                                  {"role": "assistant", "content": "Noise."}]})
                    + "\n\n" + json.dumps({"text": "Plain text sample."}) + "\n")
    items = build_calibration(ckpt, model, data, samples=5, seq_len=40)
    assert len(items) == 2 and items[0]["inputs_embeds"].shape == (1, 40, 256)  # 64 image tokens, cut to 40
    assert items[1]["inputs_embeds"].shape[1] == len(ckpt.tokenizer.encode("Plain text sample."))
    with pytest.raises(UserError, match="calibration file not found"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    for text, message in [("{}\n", "expected"), ('{"text": "ok"}\n{oops\n', "bad.jsonl:2: invalid JSON"),
                          ('{"images": ["nope.png"], "messages": [{"role": "user", "content": "x"}]}\n',
                           "bad.jsonl:1: image not found"),
                          ('{"messages": [{"role": "robot", "content": "x"}]}\n', "needs a role"),
                          ("\n", "no calibration samples")]:
        bad.write_text(text)
        with pytest.raises(UserError, match=message):
            read_jsonl(bad)
