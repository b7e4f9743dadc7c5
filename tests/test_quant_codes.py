"""int4 codes, records files and AutoAWQ packing: conventions, exactness, bit-exact round trips, config errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from minicpm.errors import UserError
from quant import QuantConfig, QuantRecord, load_records, rtn_quantize, save_records
from quant.autoawq import gemm_from_record, import_autoawq, load_autoawq, pack_int4, record_from_gemm, unpack_int4
from quant.codes import quantize_groups


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matrices: OpenMP threads cost more than they bring (and suffer badly on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class TwoLayers(nn.Module):
    def __init__(self, width: int = 256):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])
        self.lm_head = nn.Linear(width, 96, bias=False)
        self.embed = nn.Embedding(96, width)

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = x + torch.relu(layer(x))
        return self.lm_head(x)


def expand(t: torch.Tensor, group_size: int) -> torch.Tensor:
    return t.repeat_interleave(group_size, dim=1)


# ---------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    ({"group_size": 100}, "group_size must be one of 32, 64, 128"),
    ({"bits": 3}, "bits must be 4"),
    ({"symmetric": "yes"}, "symmetric must be True or False"),
    ({"alpha_grid": 0}, "alpha_grid must be an integer >= 1"),
    ({"clip_grid": 2.5}, "clip_grid must be an integer >= 1"),
    ({"min_clip_ratio": 0}, "min_clip_ratio must be in (0, 1]"),
    ({"min_clip_ratio": 1.5}, "min_clip_ratio must be in (0, 1]"),
    ({"lm_head": "int4"}, "lm_head must be 'keep' or 'int8'"),
    ({"embeddings": "fp8"}, "embeddings must be 'keep' or 'int8'"),
    ({"skip": ["(unclosed"]}, "skip pattern '(unclosed' is not a valid regular expression"),
    ({"blocks": ()}, "blocks must be module paths"),
    ({"device": "gpu0"}, "device 'gpu0' is not a torch device"),
])
def test_bad_config_is_one_clear_line(kwargs, message):
    with pytest.raises(UserError, match=None) as e:
        QuantConfig(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_config_json_round_trip():
    config = QuantConfig(group_size=64, symmetric=True, skip=[r"\.k_proj$"], blocks="layers", lm_head="int8")
    assert config.skip == (r"\.k_proj$",) and config.blocks == ("layers",)
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown keys nonsense"):
        QuantConfig.from_dict({**config.to_dict(), "nonsense": 1})


# ---------------------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_codes_in_range_and_dequantisation_exact(symmetric, group_size):
    torch.manual_seed(0)
    model = TwoLayers()
    with torch.no_grad():
        model.layers[0].weight[:, :group_size] += 1.0  # a one-signed group: the range must still cover it
    result = rtn_quantize(model, QuantConfig(group_size=group_size, symmetric=symmetric,
                                             lm_head="int8", embeddings="int8"))
    assert set(result.records) == {"layers.0", "layers.1", "lm_head", "embed"}
    for name, rec in result.records.items():
        rec.check(name)
        top = 15 if rec.bits == 4 else 255
        assert rec.codes.dtype == torch.uint8 and int(rec.codes.max()) <= top
        assert rec.scales.dtype == torch.float16 and bool((rec.scales > 0).all())
        if rec.symmetric:
            assert bool((rec.zeros == (8 if rec.bits == 4 else 128)).all())
        g = rec.group_size
        by_hand = (rec.codes.float() - expand(rec.zeros, g).float()) * expand(rec.scales, g).float()
        assert torch.equal(rec.dequantize(), by_hand)
        assert torch.equal(model.get_submodule(name).weight, by_hand)  # the fake-quant model holds exactly this
    assert result.records["lm_head"].group_size == 256 and result.records["embed"].scales.shape == (96, 1)
    assert result.report["layers"]["layers.0"]["weight_error"] < 0.15


def test_tied_head_and_embeddings_need_one_setting():
    model = TwoLayers()
    model.lm_head.weight = model.embed.weight
    with pytest.raises(UserError, match="lm_head and embed share one weight"):
        rtn_quantize(copy.deepcopy(model), QuantConfig(lm_head="int8"))
    result = rtn_quantize(model, QuantConfig(lm_head="int8", embeddings="int8"))
    assert torch.equal(result.records["lm_head"].codes, result.records["embed"].codes)


def test_symmetric_convention():
    w = torch.tensor([[-7.0, -3.5, 0.0, 7.0] * 8])
    q, scale, zero = quantize_groups(w, 4, 32, symmetric=True)
    assert float(scale[0, 0]) == 1.0 and float(zero[0, 0]) == 8  # scale = max|w| / 7, zero point 8
    assert q[0, :4].tolist() == [1.0, 4.0, 8.0, 15.0]  # codes q + 8: -7 -> 1, -3.5 -> round(-3.5) + 8, 0 -> 8, 7 -> 15


# ---------------------------------------------------------------------------------------------------------
# Records file
# ---------------------------------------------------------------------------------------------------------


def test_records_round_trip_bit_exact(tmp_path):
    torch.manual_seed(1)
    config = QuantConfig(group_size=64, lm_head="int8")
    result = rtn_quantize(TwoLayers(), config)
    result.records["layers.1"].input_scale = torch.rand(256).half() + 0.5  # exercise the optional tensor
    path = save_records(tmp_path / "sub" / "quant_records.safetensors", result.records, config)
    assert sorted(p.name for p in path.parent.iterdir()) == ["quant_records.safetensors"]  # no temp file left
    records, loaded_config = load_records(path)
    assert loaded_config == config and records.keys() == result.records.keys()
    for name, rec in result.records.items():
        got = records[name]
        for field in ("codes", "scales", "zeros", "input_scale"):
            a, b = getattr(rec, field), getattr(got, field)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), (name, field)
        assert (got.bits, got.group_size, got.symmetric) == (rec.bits, rec.group_size, rec.symmetric)


def test_records_file_errors(tmp_path):
    with pytest.raises(UserError, match="quantisation records not found"):
        load_records(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read safetensors"):
        load_records(bad)
    rec = QuantRecord(torch.full((4, 32), 16, dtype=torch.uint8), torch.ones(4, 1).half(),
                      torch.zeros(4, 1, dtype=torch.uint8), group_size=32, bits=4, symmetric=False)
    with pytest.raises(UserError, match="codes or zeros above 15"):
        save_records(tmp_path / "r.safetensors", {"x": rec}, QuantConfig())


# ---------------------------------------------------------------------------------------------------------
# AutoAWQ GEMM
# ---------------------------------------------------------------------------------------------------------


def autoawq_pack_reference(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop, transcribed: intweight [in, out] -> int32 [in, out/8]."""
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int64)
    for col in range(intweight.shape[1] // 8):
        for i, j in enumerate([0, 2, 4, 6, 1, 3, 5, 7]):
            qweight[:, col] |= intweight[:, col * 8 + j].to(torch.int64) << (i * 4)
    return torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)


def test_nibble_order():
    codes = torch.arange(8, dtype=torch.uint8)[None]  # output channels 0..7 hold codes 0..7
    assert int(pack_int4(codes)[0, 0]) == 0x75316420  # nibbles, low first: channels 0, 2, 4, 6, 1, 3, 5, 7
    assert torch.equal(unpack_int4(pack_int4(codes)), codes)


def test_gemm_packing_round_trips_bit_exactly():
    g = torch.Generator().manual_seed(2)
    codes = torch.randint(0, 16, (96, 64), generator=g, dtype=torch.uint8)  # [in, out], all nibbles incl. 15 << 28
    codes[0, 7] = 15  # the sign bit of an int32
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and torch.equal(packed, autoawq_pack_reference(codes))
    assert torch.equal(unpack_int4(packed), codes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_autoawq_import_and_export(tmp_path, symmetric):
    torch.manual_seed(3)
    record = rtn_quantize(TwoLayers(), QuantConfig(group_size=32, symmetric=symmetric)).records["layers.0"]
    gemm = gemm_from_record(record)
    assert gemm["qweight"].shape == (256, 32) and gemm["qzeros"].shape == (8, 32) and gemm["scales"].shape == (8, 256)
    back = record_from_gemm(gemm["qweight"], gemm["qzeros"], gemm["scales"])
    for field in ("codes", "scales", "zeros"):
        assert torch.equal(getattr(back, field), getattr(record, field))
    # Dequantised the AutoAWQ way, w[o, i] = (q[i, o] - z[i // g, o]) * s[i // g, o], from the packed tensors.
    q = unpack_int4(gemm["qweight"]).float()
    z = unpack_int4(gemm["qzeros"]).float().repeat_interleave(32, 0)
    s = gemm["scales"].float().repeat_interleave(32, 0)
    assert torch.equal(back.dequantize(), ((q - z) * s).T)
    # A checkpoint on disk: layers found by name, without re-quantising.
    from safetensors.torch import save_file
    save_file({f"model.layers.0.mlp.up_proj.{k}": v for k, v in gemm.items()} | {"model.norm.weight": torch.ones(4)},
              str(tmp_path / "model.safetensors"))
    imported = load_autoawq(tmp_path)
    assert list(imported) == ["model.layers.0.mlp.up_proj"]
    assert torch.equal(imported["model.layers.0.mlp.up_proj"].codes, record.codes)


def test_autoawq_errors():
    good = gemm_from_record(rtn_quantize(TwoLayers(), QuantConfig(group_size=32)).records["layers.0"])
    with pytest.raises(UserError, match="lacks 'x.qzeros'"):
        import_autoawq({"x.qweight": good["qweight"], "x.scales": good["scales"]})
    with pytest.raises(UserError, match="inconsistent AutoAWQ shapes"):
        record_from_gemm(good["qweight"], good["qzeros"][:3], good["scales"])
    with pytest.raises(UserError, match="multiple of 8 output channels"):
        pack_int4(torch.zeros(4, 12, dtype=torch.uint8))
    rec = copy.copy(rtn_quantize(TwoLayers(), QuantConfig(group_size=32)).records["layers.0"])
    rec.input_scale = torch.ones(256).half()
    with pytest.raises(UserError, match="explicit input scale"):
        gemm_from_record(rec)
