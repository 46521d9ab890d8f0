import filecmp
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import bluelm_quant.layer_job as layer_job
import bluelm_quant.pipeline as pipeline
from bluelm_quant.gptq import GPTQ
from bluelm_quant.layer_job import LayerJob
from bluelm_quant.loading import load_quantized
from bluelm_quant.config import QuantConfig
from bluelm_quant.models import UnsupportedModelError
from bluelm_quant.nn import QuantLinear
from bluelm_quant.pipeline import RunOptions, quantize_model
from bluelm_quant.quantizer import rtn
from bluelm_quant.shards import CheckpointError
from bluelm_quant.workdir import ResumeError

from tiny_models import save_tiny_llama_dir, tiny_llama, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = QuantConfig(bits=4, group_size=32, desc_act=True)


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory):
    return save_tiny_llama_dir(str(tmp_path_factory.mktemp("fp") / "tiny"), num_hidden_layers=4)


def windows(n=16, seq=64):
    return tokens(n, seq, vocab=258, seed=3)


def model_files(path):
    return sorted(f for f in os.listdir(path) if not f.startswith("quantize_report"))


def assert_same_checkpoint(a, b):
    assert model_files(a) == model_files(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, model_files(a), shallow=False)
    assert not mismatch and not errors, (mismatch, errors)


def test_gptq_checkpoint_loads_and_beats_rtn(fp_dir, tmp_path):
    out = str(tmp_path / "q")
    report = quantize_model(fp_dir, out, CONFIG, windows(), RunOptions(progress=False))
    assert report["summary"]["layers"] == 4
    assert os.path.exists(os.path.join(out, "quantize_report.png"))
    assert not os.path.exists(out + ".partial")
    q = load_quantized(out, dtype=torch.float32)
    assert isinstance(q.model.layers[3].mlp.down_proj, QuantLinear)
    from transformers import AutoModelForCausalLM

    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    ids = windows(8, 64)  # the same distribution as the calibration data
    ref = fp(ids).logits
    rtn_model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        for m in rtn_model.modules():
            if isinstance(m, torch.nn.Linear) and m is not rtn_model.lm_head:
                m.weight.copy_(rtn(m.weight, CONFIG).dequantize())
    gptq_err = (q(ids).logits - ref).pow(2).mean()
    rtn_err = (rtn_model(ids).logits - ref).pow(2).mean()
    assert gptq_err < 0.8 * rtn_err


def test_resume_after_a_crash_is_bit_identical(fp_dir, tmp_path, monkeypatch):
    straight = str(tmp_path / "straight")
    quantize_model(fp_dir, straight, CONFIG, windows(), RunOptions(progress=False))

    out = str(tmp_path / "resumed")
    real = LayerJob.quantize
    calls = []

    def crash_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(LayerJob, "quantize", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(fp_dir, out, CONFIG, windows(), RunOptions(progress=False))
    monkeypatch.setattr(LayerJob, "quantize", real)
    assert not os.path.exists(out)  # nothing that looks complete
    assert sorted(os.listdir(out + ".partial/layers")) == ["layer_0000.safetensors", "layer_0001.safetensors"]
    with pytest.raises(FileExistsError, match="--resume"):
        quantize_model(fp_dir, out, CONFIG, windows(), RunOptions(progress=False))
    with pytest.raises(ResumeError, match="group_size"):
        quantize_model(fp_dir, out, QuantConfig(group_size=64, desc_act=True), windows(), RunOptions(progress=False, resume=True))
    with pytest.raises(ResumeError, match="windows_sha256"):
        quantize_model(fp_dir, out, CONFIG, tokens(16, 64, vocab=258, seed=9), RunOptions(progress=False, resume=True))
    quantize_model(fp_dir, out, CONFIG, windows(), RunOptions(progress=False, resume=True))
    assert_same_checkpoint(straight, out)


@pytest.mark.parametrize("sequential", [True, False])
def test_replaying_tail_linears_changes_nothing(fp_dir, tmp_path, monkeypatch, sequential):
    """Memoized attention/MLP passes (memo.py) give the checkpoint a full re-run gives."""
    import dataclasses

    config = dataclasses.replace(CONFIG, true_sequential=sequential)
    monkeypatch.setattr(pipeline, "TOKENS_PER_BATCH", 5 * 64)  # batches of 5, 5, 5 and 1 windows
    memo = str(tmp_path / "memo")
    quantize_model(fp_dir, memo, config, windows(), RunOptions(progress=False))
    monkeypatch.setattr(layer_job, "MEMO_MAX_BYTES", 0)  # nothing fits: every pass runs the whole layer
    full = str(tmp_path / "full")
    quantize_model(fp_dir, full, config, windows(), RunOptions(progress=False))
    assert_same_checkpoint(memo, full)


def test_a_wrong_tails_spec_is_caught(fp_dir, tmp_path, monkeypatch):
    import dataclasses

    from bluelm_quant import models

    wrong = dataclasses.replace(models.LLAMA, tails=(("self_attn", "self_attn.q_proj"),))  # attention is not q_proj(x)
    monkeypatch.setattr(pipeline, "spec_for", lambda config: wrong)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.0\.self_attn.*tails"):
        quantize_model(fp_dir, str(tmp_path / "q"), CONFIG, windows(), RunOptions(progress=False))


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_source_shards_are_unmapped_once_a_layer_is_loaded(tmp_path, monkeypatch):
    """Open maps keep the pages read through them resident: RSS would grow layer by layer."""
    import json

    fp_dir = save_tiny_llama_dir(str(tmp_path / "fp"), num_hidden_layers=4)  # no other test maps it

    with open(os.path.join(fp_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    real, seen = LayerJob.quantize, {}

    def spy(job, *args, **kwargs):
        with open("/proc/self/maps") as f:
            mapped = {os.path.basename(line.split()[-1]) for line in f if fp_dir in line}
        seen[job.name] = (mapped, {v for k, v in weight_map.items() if k.startswith(job.name + ".")})
        return real(job, *args, **kwargs)

    monkeypatch.setattr(LayerJob, "quantize", spy)
    quantize_model(fp_dir, str(tmp_path / "q"), CONFIG, windows(), RunOptions(progress=False))
    assert len(seen) == 4
    for name, (mapped, own) in seen.items():
        assert mapped <= own, (name, mapped - own)


def test_gptq_matches_the_checkpoint_weights_not_their_bf16_forward_copy(fp_dir, tmp_path, monkeypatch):
    """Layers run in bf16 on CPUs with native bf16; the solver must still see the fp32 source."""
    from safetensors.torch import load_file

    real, seen = GPTQ.quantize, []
    monkeypatch.setattr(GPTQ, "quantize", lambda self, weight, *a, **k: seen.append(weight.clone()) or real(self, weight, *a, **k))
    quantize_model(fp_dir, str(tmp_path / "q"), CONFIG, windows(), RunOptions(progress=False, dtype=torch.bfloat16))
    source = {}
    for f in os.listdir(fp_dir):
        if f.endswith(".safetensors"):
            source.update(load_file(os.path.join(fp_dir, f)))
    qkv = torch.cat([source[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert source["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    assert torch.equal(seen[0], qkv)  # not bf16-rounded
    assert not torch.equal(seen[0], qkv.bfloat16().float())


def test_kill_9_mid_run_then_resume(fp_dir, tmp_path):
    """A real SIGKILL while layers are being written, then --resume."""
    common = [sys.executable, os.path.join(ROOT, "tools", "quantize.py"), "--model", fp_dir, "--group-size", "32",
              "--nsamples", "48", "--seqlen", "64", "--eval-windows", "0", "-q"]
    straight, out = str(tmp_path / "straight"), str(tmp_path / "killed")
    subprocess.run(common + ["--out", straight], check=True, cwd=ROOT, capture_output=True)
    proc = subprocess.Popen(common + ["--out", out], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = os.path.join(out + ".partial", "layers", "layer_0000.safetensors")
    deadline = time.time() + 120
    while not os.path.exists(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "config.json")), "killed run must not look complete"
    done = len(os.listdir(out + ".partial/layers"))
    assert 1 <= done < 4
    subprocess.run(common + ["--out", out, "--resume"], check=True, cwd=ROOT, capture_output=True)
    assert_same_checkpoint(straight, out)


def test_refuses_existing_output(fp_dir, tmp_path):
    out = str(tmp_path / "q")
    os.makedirs(out)
    with pytest.raises(FileExistsError, match="--overwrite"):
        quantize_model(fp_dir, out, CONFIG, windows(), RunOptions(progress=False))


def test_directory_without_weights_or_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        quantize_model(str(tmp_path), str(tmp_path / "q"), CONFIG, windows(), RunOptions(progress=False))
    tiny_llama().config.save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match="no weights"):
        quantize_model(str(tmp_path), str(tmp_path / "q"), CONFIG, windows(), RunOptions(progress=False))


def test_unknown_architecture_says_how_to_add_one(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(str(tmp_path / "gpt2"))
    with pytest.raises(UnsupportedModelError, match="ModelSpec"):
        quantize_model(str(tmp_path / "gpt2"), str(tmp_path / "q"), CONFIG, windows(4, 8), RunOptions(progress=False))


def test_nan_activations_name_the_layer(tmp_path):
    model = tiny_llama(num_hidden_layers=2, vocab_size=258)
    with torch.no_grad():
        model.model.layers[1].input_layernorm.weight.fill_(float("nan"))
    model.save_pretrained(str(tmp_path / "fp"))
    with pytest.raises(Exception, match=r"model\.layers\.1.*NaN/Inf"):
        quantize_model(str(tmp_path / "fp"), str(tmp_path / "q"), CONFIG, windows(), RunOptions(progress=False))


def test_tokens_outside_the_vocabulary(fp_dir, tmp_path):
    with pytest.raises(ValueError, match="vocab_size=258"):
        quantize_model(fp_dir, str(tmp_path / "q"), CONFIG, torch.full((2, 8), 299), RunOptions(progress=False))


@pytest.mark.parametrize("device", ["banana", "xpu:0"])
def test_bad_device_is_refused_before_any_work(fp_dir, tmp_path, device):
    from bluelm_quant.placement import DeviceError

    with pytest.raises(DeviceError, match=device.split(":")[0]):
        quantize_model(fp_dir, str(tmp_path / "q"), CONFIG, windows(), RunOptions(device=device, progress=False))
    assert not os.path.exists(str(tmp_path / "q.partial"))
