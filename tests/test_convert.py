"""bluelm_quant.convert / bluelm-convert: existing 4-bit layouts rewritten into the standard one."""
import json
import os

import pytest
import torch

from bluelm_fixtures import tiny_model
from bluelm_quant.cli.convert import main as convert_main
from bluelm_quant.convert import ConversionError, convert
from bluelm_quant.loading import load_quantized
from bluelm_quant.modeldir import ModelDir
from bluelm_quant.outputs import OutputError
from bluelm_quant.packing import convert_qzeros, pack_qzeros
from test_bluelm_checkpoints import AUTOGPTQ_QUANTIZE_CONFIG, GPTQ_ROWS, LEGACY_ROWS, NTKMIXED, write_gptq_32k, write_legacy_4bits


def snapshot(path):
    return {f: os.path.getmtime(os.path.join(path, f)) for f in sorted(os.listdir(path))}


def logits(model, vocab):
    ids = torch.randint(4, min(vocab, 600), (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("legacy") / "BlueLM-7B-Chat-4bits")
    write_legacy_4bits(path, tiny_model(seed=1, vocab_size=LEGACY_ROWS), bit_key={"quantization_bit": 4})
    (open(os.path.join(path, "modeling_bluelm.py"), "w")).write("# remote code of the legacy kernel\n")
    return path


def test_legacy_layout_becomes_the_standard_one(legacy, tmp_path):
    before = snapshot(legacy)
    out = str(tmp_path / "standard")
    report = convert(legacy, out)
    assert snapshot(legacy) == before  # the source is only read
    files = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in files and "quantize_config.json" in files
    assert not [f for f in files if f.endswith((".bin", ".py"))]
    hf = json.load(open(os.path.join(out, "config.json")))
    assert "auto_map" not in hf and hf["torch_dtype"] == "bfloat16"
    qc = hf["quantization_config"]
    assert qc["group_size"] == 32 and qc["desc_act"] is False and qc["sym"] is False and qc["checkpoint_format"] == "gptq"
    out_dir = ModelDir(out)
    assert out_dir.layout == "gptq" and "model.layers.0.mlp.up_proj.g_idx" in out_dir.reader
    assert out_dir.reader.dtype("model.layers.0.mlp.up_proj.scales") == torch.float16
    # fp32 scales rounded to fp16: measured and reported, and the model computes the same within that
    assert report.scales_changed > 0 and 0 < report.scale_max_rel_error <= 2.0**-11
    assert any("asymmetric" in n for n in report.notes)  # vLLM would refuse these zeros: said, not hidden
    a = logits(load_quantized(legacy, dtype=torch.float32), LEGACY_ROWS)
    b = logits(load_quantized(out, dtype=torch.float32), LEGACY_ROWS)
    torch.testing.assert_close(b, a, atol=2e-3, rtol=2e-3)


def test_dynamic_act_order_is_refused_and_nothing_is_written(tmp_path):
    src = str(tmp_path / "gptq")
    write_gptq_32k(src, tiny_model(seed=2, vocab_size=GPTQ_ROWS, rope_scaling=NTKMIXED), act_order=True)
    with pytest.raises(ConversionError, match="dynamic act-order"):
        convert(src, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    assert not [f for f in os.listdir(tmp_path) if f.startswith((".tmp-", "out"))]


def test_static_act_order_and_v2_zeros_become_vllm_ready(tmp_path):
    """desc_act true with a monotone g_idx is the plain layout: desc_act false; v2 zeros -> v1, exactly."""
    src = str(tmp_path / "gptq")
    write_gptq_32k(src, tiny_model(seed=2, vocab_size=GPTQ_ROWS, rope_scaling=NTKMIXED), act_order=False)
    with open(os.path.join(src, "quantize_config.json"), "w") as f:
        json.dump(dict(AUTOGPTQ_QUANTIZE_CONFIG, desc_act=True, checkpoint_format="gptq_v2"), f)
    index = json.load(open(os.path.join(src, "model.safetensors.index.json")))["weight_map"]
    from safetensors.torch import load_file, save_file

    for shard in sorted(set(index.values())):  # rewrite the zeros in the v2 convention
        path = os.path.join(src, shard)
        state = load_file(path)
        state = {k: convert_qzeros(v, 4, "gptq", "gptq_v2") if k.endswith(".qzeros") else v for k, v in state.items()}
        save_file(state, path, metadata={"format": "pt"})
    out = str(tmp_path / "out")
    report = convert(src, out, dtype="float16")
    qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
    assert qc["desc_act"] is False and qc["meta"]["act_order"] == "static" and qc["sym"] is True
    assert qc["checkpoint_format"] == "gptq" and report.notes == []  # nothing vLLM would refuse
    z = ModelDir(out).reader.get("model.layers.0.mlp.up_proj.qzeros")
    assert torch.equal(z, pack_qzeros(torch.full((z.shape[0], z.shape[1] * 8), 8, dtype=torch.int32), 4))
    a = logits(load_quantized(src, dtype=torch.float32), GPTQ_ROWS)
    torch.testing.assert_close(logits(load_quantized(out, dtype=torch.float32), GPTQ_ROWS), a, atol=1e-2, rtol=1e-2)


def test_bad_paths_and_the_command_line(legacy, tmp_path, capsys):
    with pytest.raises(OutputError, match="is inside the source"):
        convert(legacy, os.path.join(legacy, "inside"))
    with pytest.raises(OutputError, match="is the source"):
        convert(legacy, legacy, overwrite=True)
    with pytest.raises(OutputError, match="contains the source"):
        convert(legacy, os.path.dirname(legacy), overwrite=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="does not look like a quantized checkpoint"):
        convert(legacy, str(mine), overwrite=True)  # --overwrite replaces checkpoints, not the user's files
    assert (mine / "notes.txt").read_text() == "keep"
    assert convert_main(["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "not a directory" in err[0]
    full = str(tmp_path / "full")
    tiny_model().save_pretrained(full)
    assert convert_main(["--model", full, "--out", str(tmp_path / "o")]) == 2
    assert "not a quantized checkpoint" in capsys.readouterr().err
    assert convert_main(["--model", legacy, "--out", str(tmp_path / "ok")]) == 0
    assert "converted" in capsys.readouterr().out
