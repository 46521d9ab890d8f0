import pytest
import torch

from bluelm_quant.config import QuantConfig, QuantConfigError
from bluelm_quant.quantizer import default_g_idx, find_params, rtn


@pytest.mark.parametrize("group_size,groups", [(128, 5), (32, 18), (64, 9), (-1, 1), (576, 1), (200, 3)])
def test_partial_last_group(group_size, groups):
    w = torch.randn(16, 576)
    qw = rtn(w, QuantConfig(group_size=group_size))
    assert qw.scales.shape == (groups, 16)
    assert qw.g_idx.tolist() == default_g_idx(576, group_size).tolist()
    assert int(qw.g_idx.max()) == groups - 1


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_within_half_a_step(sym, bits):
    w = torch.randn(32, 256)
    qw = rtn(w, QuantConfig(bits=bits, group_size=64, sym=sym))
    assert int(qw.codes.min()) >= 0 and int(qw.codes.max()) <= 2**bits - 1
    err = (qw.dequantize() - w).abs()
    step = qw.scales[qw.g_idx.long()].T
    # half a step, plus the drift of rounding the scale to fp16 (2**-11 relative) over the range
    assert bool((err <= step * (0.5 + 2**bits * 2**-11) + 1e-6).all())
    if sym:
        assert bool((qw.zeros == 2 ** (bits - 1)).all())
    else:
        assert int(qw.zeros.min()) >= 1  # v1-storable


def test_asym_zero_never_zero_even_for_positive_groups():
    w = torch.rand(8, 64) + 0.5  # all positive: the plain grid would put zero at 0
    qw = rtn(w, QuantConfig(group_size=32, sym=False))
    assert int(qw.zeros.min()) == 1
    assert (qw.dequantize() - w).abs().max() <= qw.scales.max() * 0.5 + 1e-6


def test_scales_are_exactly_storable_in_fp16():
    qw = rtn(torch.randn(8, 64), QuantConfig(group_size=32))
    assert torch.equal(qw.scales.half().float(), qw.scales)


def test_mse_clip_lowers_error_on_heavy_tails():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 256, generator=g)
    w[:, ::37] *= 12  # outliers make the min/max grid coarse
    plain = rtn(w, QuantConfig(group_size=-1, sym=False))
    clipped = rtn(w, QuantConfig(group_size=-1, sym=False, mse_clip=True))
    e_plain = (plain.dequantize() - w).pow(2).sum()
    e_clip = (clipped.dequantize() - w).pow(2).sum()
    assert e_clip < e_plain


def test_all_zero_rows_are_fine():
    scale, zero = find_params(torch.zeros(4, 32), 4, sym=False)
    assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())


@pytest.mark.parametrize("kwargs", [{"bits": 5}, {"group_size": 0}, {"group_size": 12}, {"damp_percent": 0.0}, {"checkpoint_format": "awq"}])
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(QuantConfigError):
        QuantConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    cfg = QuantConfig(bits=3, group_size=64, sym=False, desc_act=True, static_groups=True, damp_percent=0.05, mse_clip=True)
    cfg.save(str(tmp_path))
    assert QuantConfig.load(str(tmp_path / "quantize_config.json")) == cfg
    d = cfg.to_dict()
    assert d["quant_method"] == "gptq" and d["checkpoint_format"] == "gptq"
    with pytest.raises(QuantConfigError, match="awq"):
        QuantConfig.from_dict({**d, "quant_method": "awq"})


def test_static_act_order_is_written_as_the_plain_layout_and_read_back():
    static = QuantConfig(desc_act=True, static_groups=True)
    d = static.to_dict()
    assert d["desc_act"] is False and d["meta"]["act_order"] == "static"  # what vLLM accepts
    assert QuantConfig.from_dict(d) == static
    dynamic = QuantConfig(desc_act=True)
    assert dynamic.to_dict()["desc_act"] is True and dynamic.to_dict()["meta"]["act_order"] == "dynamic"
    assert QuantConfig.from_dict(dynamic.to_dict()) == dynamic
    # Another tool's checkpoint: desc_act + static_groups, its own meta kept on a round trip.
    theirs = {"bits": 4, "group_size": 128, "desc_act": True, "static_groups": True, "sym": True,
              "meta": {"quantizer": ["gptqmodel:5.0"], "uri": "x"}}
    read = QuantConfig.from_dict(theirs)
    assert read.act_order == "static" and read.to_dict()["meta"]["quantizer"] == ["gptqmodel:5.0"]


def test_dynamic_overrides_per_module():
    config = QuantConfig(group_size=128, dynamic={r"+:.*\.(q|k|v)_proj": {"group_size": 64}, r"-:.*lm_head": {}})
    assert config.for_module("model.layers.0.self_attn.q_proj").group_size == 64
    assert config.for_module("model.layers.0.mlp.down_proj").group_size == 128
    assert config.for_module("lm_head") is None
    assert QuantConfig.from_dict(config.to_dict()) == config
    with pytest.raises(QuantConfigError, match="group_size=12"):
        QuantConfig(dynamic={"+:x": {"group_size": 12}})
    with pytest.raises(QuantConfigError, match="not a valid regex"):
        QuantConfig(dynamic={"+:(": {}})


def test_engine_rules_for_group_sizes_and_settings():
    from bluelm_quant.engines import dividing_group_size, engine_notes, partial_group_widths

    smollm2 = [576, 576, 1536]  # q/k/v/o/gate/up read 576 inputs, down_proj 1536
    assert partial_group_widths(128, smollm2) == [576] and partial_group_widths(-1, smollm2) == []
    assert dividing_group_size(128, smollm2) == 64
    assert dividing_group_size(128, [4096, 11008]) == 128  # BlueLM-7B: g128 fits
    assert dividing_group_size(128, [4096, 100]) is None
    assert engine_notes(QuantConfig(desc_act=True, static_groups=True)) == []
    notes = " ".join(engine_notes(QuantConfig(bits=3, sym=False, group_size=256, desc_act=True)))
    assert "asymmetric" in notes and "3-bit" in notes and "group size 256" in notes and "dynamic act-order" in notes
