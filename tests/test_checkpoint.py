import json
import os

import pytest
import torch

from bluelm_quant.loading import load_quantized
from bluelm_quant.saving import save_quantized
from bluelm_quant.config import QuantConfig, QuantConfigError
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.packing import pack_qweight, pack_qzeros
from bluelm_quant.quantizer import rtn
from bluelm_quant.shards import CheckpointError

from tiny_models import tiny_llama, tokens


def _quantized_tiny(tie=False, config=None):
    model = tiny_llama(tie=tie)
    config = config or QuantConfig(bits=4, group_size=32, sym=False)
    replace_linear(model, config, quantize=True)
    # Inference only: a parameter that requires grad would send forward through the
    # autograd-friendly reference path, while the loaded model takes the kernel.
    model.requires_grad_(False)
    return model, config


@pytest.mark.parametrize("tie", [False, True])
def test_rtn_save_load_gives_identical_logits(tmp_path, tie):
    model, config = _quantized_tiny(tie)
    ids = tokens()
    expected = model(ids).logits
    out = str(tmp_path / "q")
    save_quantized(model, out, config, max_shard_size=40_000)
    files = sorted(os.listdir(out))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    qc = json.load(open(os.path.join(out, "quantize_config.json")))
    assert {qc[k] for k in ("quant_method", "checkpoint_format")} == {"gptq"}
    assert {"bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential", "damp_percent"} <= set(qc)
    hf = json.load(open(os.path.join(out, "config.json")))
    assert hf["quantization_config"]["quant_method"] == "gptq"
    loaded = load_quantized(out, dtype=torch.float32)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
    assert torch.equal(loaded(ids).logits, expected)  # to the last bit
    if tie:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_saved_tensors_have_the_standard_dtypes(tmp_path):
    from safetensors import safe_open

    model, config = _quantized_tiny()
    save_quantized(model, str(tmp_path / "q"), config)
    with safe_open(str(tmp_path / "q" / "model-00001-of-00001.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        name = "model.layers.0.mlp.up_proj"
        assert f.get_tensor(f"{name}.scales").dtype == torch.float16
        assert f.get_tensor(f"{name}.qweight").dtype == torch.int32
        assert f.get_tensor(f"{name}.g_idx").dtype == torch.int32
        assert f"{name}.bias" not in f.keys()


def test_gptq_v2_zeros_load_like_v1(tmp_path):
    model, config = _quantized_tiny()
    ids = tokens()
    out = str(tmp_path / "v2")
    v2 = QuantConfig(bits=4, group_size=32, sym=False, checkpoint_format="gptq_v2")
    # rewrite each layer's zeros in the v2 convention before saving
    from bluelm_quant.packing import convert_qzeros

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.qzeros = convert_qzeros(m.qzeros, 4, "gptq", "gptq_v2")
    save_quantized(model, out, v2)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.qzeros = convert_qzeros(m.qzeros, 4, "gptq_v2", "gptq")
    assert torch.equal(load_quantized(out, dtype=torch.float32)(ids).logits, model(ids).logits)


def _write_legacy_bluelm_style(model_fp, out, group_size):
    """The BlueLM-7B-Chat-4bits layout: .bin shards + index, qweight/qzeros/scales only,
    fp32 scales, no g_idx, no bias, config.json with no quantization_config."""
    os.makedirs(out)
    config = QuantConfig(bits=4, group_size=group_size, sym=False)
    state, expected = {}, {}
    for name, t in model_fp.state_dict().items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and ".layers." in name and t.dim() == 2:
            qw = rtn(t, config, scale_dtype=torch.float32)
            state[f"{module}.qweight"] = pack_qweight(qw.codes.T, 4)
            state[f"{module}.qzeros"] = pack_qzeros(qw.zeros, 4, "gptq")
            state[f"{module}.scales"] = qw.scales.float()
            expected[name] = qw.dequantize()
        else:
            state[name] = t.to(torch.bfloat16)
            expected[name] = t.to(torch.bfloat16).float()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # 2023-era leftover
    keys = list(state)
    parts = [keys[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        fname = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: state[k] for k in part}, os.path.join(out, fname))
        weight_map.update({k: fname for k in part})
    json.dump({"metadata": {}, "weight_map": weight_map}, open(os.path.join(out, "pytorch_model.bin.index.json"), "w"))
    cfg = model_fp.config.to_dict()
    cfg["torch_dtype"] = "bfloat16"
    cfg["quantization_bit"] = 4
    json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
    return expected


@pytest.mark.parametrize("group_size", [32, -1])
def test_legacy_bluelm_4bit_layout_loads(tmp_path, group_size):
    fp = tiny_llama()
    out = str(tmp_path / "legacy")
    expected = _write_legacy_bluelm_style(fp, out, group_size)
    loaded = load_quantized(out, dtype=torch.float32)
    layer = loaded.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.group_size == group_size
    fp.load_state_dict(expected)  # the same model, dequantized, in full precision
    ids = tokens()
    torch.testing.assert_close(loaded(ids).logits, fp(ids).logits, atol=1e-4, rtol=1e-4)


# --- bad input ----------------------------------------------------------------------------


def _saved(tmp_path):
    model, config = _quantized_tiny()
    out = str(tmp_path / "q")
    save_quantized(model, out, config, max_shard_size=40_000)
    return out


def test_truncated_shard_is_named(tmp_path):
    out = _saved(tmp_path)
    path = os.path.join(out, sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[0])
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=os.path.basename(path)):
        load_quantized(out)


def test_missing_shard_is_named(tmp_path):
    out = _saved(tmp_path)
    victim = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))[-1]
    os.remove(os.path.join(out, victim))
    with pytest.raises(CheckpointError, match=victim):
        load_quantized(out)


def test_config_disagreeing_with_tensors(tmp_path):
    out = _saved(tmp_path)
    qc = json.load(open(os.path.join(out, "quantize_config.json")))
    qc["group_size"] = 64
    json.dump(qc, open(os.path.join(out, "quantize_config.json"), "w"))
    with pytest.raises(CheckpointError, match="group_size=64"):
        load_quantized(out)
    qc["group_size"], qc["bits"] = 32, 8
    json.dump(qc, open(os.path.join(out, "quantize_config.json"), "w"))
    with pytest.raises(CheckpointError, match="bits=8"):
        load_quantized(out)
    qc["bits"] = 5
    json.dump(qc, open(os.path.join(out, "quantize_config.json"), "w"))
    with pytest.raises(QuantConfigError, match="bits=5"):
        load_quantized(out)


def test_corrupt_bin_is_named(tmp_path):
    out = str(tmp_path / "legacy")
    _write_legacy_bluelm_style(tiny_llama(), out, 32)
    victim = os.path.join(out, "pytorch_model-00002-of-00003.bin")
    open(victim, "wb").write(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="pytorch_model-00002-of-00003.bin"):
        load_quantized(out)


def test_legacy_shapes_fitting_no_group_size(tmp_path):
    out = str(tmp_path / "legacy")
    _write_legacy_bluelm_style(tiny_llama(), out, 32)
    sd = torch.load(os.path.join(out, "pytorch_model-00001-of-00003.bin"), weights_only=True)
    key = next(k for k in sd if k.endswith(".scales"))
    sd[key] = torch.ones(3, sd[key].shape[1])  # 64 / 3 is not whole
    sd[key.replace("scales", "qzeros")] = torch.zeros(3, sd[key].shape[1] // 8, dtype=torch.int32)
    torch.save(sd, os.path.join(out, "pytorch_model-00001-of-00003.bin"))
    with pytest.raises(CheckpointError, match="fits no group size"):
        load_quantized(out)


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    model, config = _quantized_tiny()
    out = str(tmp_path / "q")
    os.makedirs(out)
    with pytest.raises(FileExistsError):
        save_quantized(model, out, config)
    os.rmdir(out)
    import bluelm_quant.saving as saving

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(saving, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, out, config)
    assert not os.path.exists(out)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")]


def test_not_a_quantized_dir(tmp_path):
    fp = tiny_llama()
    fp.save_pretrained(str(tmp_path / "fp"))
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(str(tmp_path / "fp"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_quantized(str(tmp_path))


def _rewrite(out, key, change):
    """Replace (change returns a tensor) or drop (change returns None) one tensor of a saved checkpoint."""
    from safetensors.torch import load_file, save_file

    index_path = os.path.join(out, "model.safetensors.index.json")
    index = json.load(open(index_path))
    path = os.path.join(out, index["weight_map"][key])
    tensors = load_file(path)
    new = change(tensors[key])
    if new is None:
        del tensors[key], index["weight_map"][key]
        json.dump(index, open(index_path, "w"))
    else:
        tensors[key] = new
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("key, change, want", [
    ("model.norm.weight", lambda t: t[:1].clone(), r"\[1\].*expects \[64\]"),
    ("model.embed_tokens.weight", lambda t: t[:, :32].clone(), r"\[128, 32\].*expects \[128, 64\]"),
    ("model.layers.1.input_layernorm.weight", lambda t: torch.ones(65), r"\[65\].*expects \[64\]"),
])
def test_every_tensor_shape_is_checked_against_the_config(tmp_path, key, change, want):
    """A norm of shape [1] would broadcast silently (issue 15: perplexity 78 million)."""
    out = _saved(tmp_path)
    _rewrite(out, key, change)
    with pytest.raises(CheckpointError, match=rf"tensor {key} in .* has shape {want}"):
        load_quantized(out)


def test_act_order_checkpoint_without_g_idx_is_refused(tmp_path):
    model, config = _quantized_tiny(config=QuantConfig(bits=4, group_size=32, desc_act=True))
    out = str(tmp_path / "q")
    save_quantized(model, out, config)
    _rewrite(out, "model.layers.0.self_attn.q_proj.g_idx", lambda t: None)
    with pytest.raises(CheckpointError, match=r"q_proj.g_idx is missing, but the quantization config says desc_act=true"):
        load_quantized(out)


def test_g_idx_may_be_omitted_without_act_order(tmp_path):
    """Without act-order, g_idx is the default order by definition: loading it is exact."""
    model, config = _quantized_tiny()
    ids = tokens()
    out = _saved(tmp_path)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        _rewrite(out, f"{name}.g_idx", lambda t: None)
    assert torch.equal(load_quantized(out, dtype=torch.float32)(ids).logits, model(ids).logits)


def test_static_act_order_checkpoint_may_omit_g_idx(tmp_path):
    """Static act-order fixes the groups before reordering: g_idx is the default order, the
    layout the plain one (desc_act false on disk), so a missing g_idx is not an error."""
    model, config = _quantized_tiny(config=QuantConfig(bits=4, group_size=32, desc_act=True, static_groups=True))
    ids = tokens()
    out = str(tmp_path / "q")
    save_quantized(model, out, config)
    _rewrite(out, "model.layers.0.self_attn.q_proj.g_idx", lambda t: None)
    assert torch.equal(load_quantized(out, dtype=torch.float32)(ids).logits, model(ids).logits)


def test_gptq_tensors_without_any_quantization_config_say_what_is_missing(tmp_path):
    model, config = _quantized_tiny(config=QuantConfig(bits=4, group_size=32))
    out = str(tmp_path / "q")
    save_quantized(model, out, config)
    os.remove(os.path.join(out, "quantize_config.json"))
    hf = json.load(open(os.path.join(out, "config.json")))
    del hf["quantization_config"]
    json.dump(hf, open(os.path.join(out, "config.json"), "w"))
    with pytest.raises(CheckpointError) as info:
        load_quantized(out)
    message = str(info.value)
    assert "no quantize_config.json and no quantization_config in config.json" in message
    assert "mlp.down_proj.qweight [16, 64]" in message and "(bits=4, group_size=32, desc_act=false)" in message
    assert "Restore the quantize_config.json" in message
