"""Slow: the real SmolLM2-135M through `tools/quantize.py`, judged against RTN on held-out text.

Group size 128 (SmolLM2 was published on a 32-wide grid, so g32 would look artificially
lossless). 32 calibration windows keep the run CI-sized; tools/compare_quality.py measures
the full 128-window figures.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from bluelm_quant.config import QuantConfig
from bluelm_quant.eval_data import heldout_text
from bluelm_quant.evaluate import perplexity
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.smollm2 import ensure_smollm2

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WINDOWS = 6  # held-out windows of 512 tokens per language


@pytest.mark.slow
def test_gptq_on_smollm2_beats_rtn_in_english_and_chinese(tmp_path):
    source = str(ensure_smollm2())
    out = str(tmp_path / "smollm2-gptq")
    cmd = [sys.executable, os.path.join(ROOT, "tools", "quantize.py"), "--model", source, "--out", out,
           "--nsamples", "32", "--eval-windows", "0", "-q"]  # default quantization settings
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Quantized 30 layers" in run.stdout
    # 128 does not divide SmolLM2's 576: the default steps down to 64 and says so.
    assert "Group size 64, not 128" in run.stdout
    written = json.load(open(os.path.join(out, "config.json")))
    assert written["quantization_config"]["group_size"] == 64 and written["dtype"] == "bfloat16"
    assert written["quantization_config"]["desc_act"] is False  # static act-order: the plain layout
    assert written["quantization_config"]["meta"]["act_order"] == "static"
    assert written["quantization_config"]["meta"]["clip_weights"] == "hessian"  # the default clip search
    for name in ("quantize_config.json", "model.safetensors.index.json", "quantize_report.png", "tokenizer.json"):
        assert os.path.isfile(os.path.join(out, name)), name

    gptq, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    assert isinstance(gptq.model.layers[0].mlp.down_proj, QuantLinear)
    rtn, _ = load_model_and_tokenizer(source, dtype=torch.float32)
    replace_linear(rtn, QuantConfig(bits=4, group_size=64), quantize=True)
    fp, _ = load_model_and_tokenizer(source, dtype=torch.float32)
    for lang in ("en", "zh"):
        text = heldout_text(lang)
        ppl = {name: perplexity(m, tok, text, seqlen=512, max_windows=WINDOWS, progress=False)
               for name, m in (("fp", fp), ("rtn", rtn), ("gptq", gptq))}
        print(lang, ppl)
        assert ppl["fp"] < ppl["gptq"] < ppl["rtn"], (lang, ppl)
