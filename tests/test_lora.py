"""LoRA on 4-bit models: the input gradient of QuantLinear, PEFT, training, saving, merging."""
import os
import re

import pytest
import torch
from torch import nn

from bluelm_quant import autograd as qgrad
from bluelm_quant.config import QuantConfig
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.quantizer import rtn

from tiny_models import tiny_llama, tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def _quant_linear(k, n, bits=4, group_size=32, sym=True, act_order=False, bias=False, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    qw = rtn(w, QuantConfig(bits=bits, group_size=group_size, sym=sym))
    if act_order:  # groups assigned over a permuted column order, as GPTQ's desc_act writes them
        gs = k if group_size == -1 else group_size
        perm = torch.randperm(k, generator=gen)
        qw.g_idx = (torch.argsort(perm) // gs).to(torch.int32)
    b = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_quantized(qw, group_size, bias=b, dtype=dtype)


def _oracle(layer: QuantLinear, x: torch.Tensor, grad_y: torch.Tensor):
    """nn.Linear holding the dequantized weight, in float64: (y, dL/dx)."""
    ref = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize(torch.float64))
        if layer.bias is not None:
            ref.bias.copy_(layer.bias.double())
    x64 = x.detach().double().requires_grad_(True)
    y = ref(x64)
    y.backward(grad_y.double())
    return y.detach(), x64.grad


CASES = [
    # bits, K, N, group size, sym, act-order, bias
    (4, 128, 64, 32, True, False, False),
    (4, 128, 64, 32, False, True, True),
    (4, 160, 72, 64, False, True, False),  # partial last group (64, 64, 32), act-order
    (4, 160, 64, 64, True, False, True),  # partial last group, contiguous
    (4, 128, 48, -1, True, False, False),  # one group per column
    (2, 128, 64, 32, False, True, True),
    (3, 192, 96, 64, False, False, True),
    (3, 160, 64, 64, True, True, False),  # 3-bit, partial last group, act-order
    (8, 128, 64, 32, False, True, False),
    (8, 96, 40, 32, True, False, True),
]


@pytest.mark.parametrize("bits,k,n,gs,sym,act_order,bias", CASES)
@pytest.mark.parametrize("small_blocks", [False, True])
def test_input_grad_equals_dequantized_linear(bits, k, n, gs, sym, act_order, bias, small_blocks, monkeypatch):
    if small_blocks:  # several backward blocks per layer, each one packing unit wide
        monkeypatch.setattr(qgrad, "BLOCK_ELEMENTS", 1)
    layer = _quant_linear(k, n, bits, gs, sym, act_order, bias)
    x = torch.randn(2, 5, k, requires_grad=True)
    grad_y = torch.randn(2, 5, n)
    y = layer(x)
    y.backward(grad_y)
    y_ref, gx_ref = _oracle(layer, x, grad_y)
    torch.testing.assert_close(y.double(), y_ref, atol=1e-4, rtol=1e-4)
    assert x.grad.dtype == torch.float32 and x.grad.shape == x.shape
    torch.testing.assert_close(x.grad.double(), gx_ref, atol=1e-4, rtol=1e-5)
    assert qgrad.block_columns(k, n, bits) % (32 if bits == 3 else 32 // bits) == 0 or qgrad.block_columns(k, n, bits) == n


@pytest.mark.parametrize("act_order", [False, True])
def test_input_grad_in_float64_is_exact(act_order):
    layer = _quant_linear(128, 64, 4, 32, False, act_order, True)
    x = torch.randn(7, 128, dtype=torch.float64, requires_grad=True)
    grad_y = torch.randn(7, 64, dtype=torch.float64)
    layer(x).backward(grad_y)
    _, gx_ref = _oracle(layer, x, grad_y)
    torch.testing.assert_close(x.grad, gx_ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float16, 3e-3)])
def test_input_grad_in_16_bit(dtype, tol):
    layer = _quant_linear(128, 64, 4, 32, True, True, True, dtype=dtype)
    x = torch.randn(3, 128).to(dtype).requires_grad_(True)
    grad_y = torch.randn(3, 64).to(dtype)
    layer(x).backward(grad_y)
    _, gx_ref = _oracle(layer, x, grad_y)
    assert x.grad.dtype == dtype
    scale = gx_ref.abs().max()
    assert (x.grad.double() - gx_ref).abs().max() <= tol * scale


def test_the_weight_stays_frozen_and_no_full_copy_is_saved():
    """Backward keeps nothing of the weight's size: it dequantizes blocks when it runs."""
    layer = _quant_linear(256, 128, 4, 64, False, True, True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert all(numel < 256 * 128 for numel in saved), saved
    assert x.grad is not None
    assert all(not b.requires_grad and b.grad is None for b in layer.buffers())
    assert list(layer.parameters()) == []


def test_the_compiled_dequantize_is_checked_once_per_configuration(monkeypatch):
    from bluelm_quant import extension, kernel_check, ops

    if extension.quant_cuda() is None:
        pytest.skip("no compiled extension")
    calls = []
    real = ops._dequantize_self_check
    monkeypatch.setattr(ops, "_dequantize_self_check", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(kernel_check.STATE, "verdicts", {})
    layer = _quant_linear(128, 64, 4, 32, False, True, False)
    for _ in range(3):
        x = torch.randn(3, 128, requires_grad=True)
        layer(x).sum().backward()
    assert len(calls) == 1
    assert any(r["config"].endswith("dequantize") and r["ok"] for r in kernel_check.report())


def test_no_grad_and_inference_paths_are_unchanged():
    layer = _quant_linear(128, 64, 4, 32, False, True, True)
    x = torch.randn(3, 128)
    with torch.no_grad():
        a = layer(x)
    b = layer(x.requires_grad_(True)).detach()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _quantized_tiny_llama(bits=4, group_size=32, seed=0):
    model = tiny_llama(seed=seed)
    replace_linear(model, QuantConfig(bits=bits, group_size=group_size, sym=False), quantize=True)
    return model.requires_grad_(False)


def _embedding_grad(model, ids, **kwargs):
    """dL/d(input embeddings) for the mean of the logits: the gradient through every layer."""
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    out = model(inputs_embeds=emb, **kwargs).logits
    out.float().square().mean().backward()
    return out.detach(), emb.grad


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradient(use_reentrant):
    model = _quantized_tiny_llama()
    ids = tokens(batch=2, seq=12)
    model.train()
    _, plain = _embedding_grad(model, ids)
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.20+
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    calls = []  # a checkpointed layer runs twice: forward, then again in backward
    hook = model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    _, checkpointed = _embedding_grad(model, ids)
    hook.remove()
    assert len(calls) == 2
    torch.testing.assert_close(checkpointed, plain, atol=1e-6, rtol=1e-5)


def test_autocast_computes_in_the_autocast_dtype():
    layer = _quant_linear(128, 64, 4, 32, False, True, True)
    x = torch.randn(5, 128, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32
    _, gx_ref = _oracle(layer, x, torch.ones(5, 64))
    assert (x.grad.double() - gx_ref).abs().max() <= 3e-2 * gx_ref.abs().max()


def test_autocast_through_a_whole_model():
    model = _quantized_tiny_llama()
    ids = tokens(batch=2, seq=12)
    out32, g32 = _embedding_grad(model, ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out16, g16 = _embedding_grad(model, ids)
    assert torch.isfinite(g16).all()
    assert (out16.float() - out32).abs().max() <= 0.05 * out32.abs().max()
    assert (g16.float() - g32).norm() <= 0.1 * g32.norm()


# --- PEFT --------------------------------------------------------------------------------------

# Not a module-level importorskip: that skipped the whole file where peft is missing (the GPU
# machine's preinstalled set has none), autograd, no-peft error and SFT-data tests included.
# Only the tests that use PEFT are marked `needs_peft`.
try:
    import peft
    from bluelm_quant.lora_layer import QuantLoraLinear  # imports peft
except ImportError:
    peft = QuantLoraLinear = None
needs_peft = pytest.mark.skipif(peft is None, reason="could not import 'peft' (pip install 'bluelm-quant[lora]')")
from bluelm_quant import lora  # noqa: E402


def _lora_model(targets=("q_proj", "v_proj"), r=4, seed=0, **kwargs):
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                             target_modules=list(targets) if not isinstance(targets, str) else targets, **kwargs)
    return lora.get_peft_model(_quantized_tiny_llama(seed=seed), config)


def _train(model, ids, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return model.eval(), losses


@needs_peft
def test_peft_wraps_quant_linears_by_name():
    model = _lora_model(("q_proj", "v_proj"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}
    assert wrapped == {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


@needs_peft
def test_all_linear_takes_every_quant_linear_but_the_head():
    model = _lora_model("all-linear")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.base_model.model.lm_head, nn.Linear)


@needs_peft
def test_a_fresh_adapter_changes_nothing_and_training_lowers_the_loss():
    base = _quantized_tiny_llama()
    ids = tokens(batch=2, seq=16, seed=3)
    with torch.no_grad():
        before = base(input_ids=ids).logits
    model = _lora_model("all-linear")
    with torch.no_grad():  # lora_B starts at zero
        torch.testing.assert_close(model(input_ids=ids).logits, before)
    _, losses = _train(model, ids, steps=6)
    assert losses[-1] < 0.8 * losses[0], losses


@needs_peft
def test_save_and_reload_through_peft_gives_identical_logits(tmp_path):
    ids = tokens(batch=2, seq=16, seed=3)
    model, _ = _train(_lora_model("all-linear"), ids, steps=3)
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(str(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(p.name for p in tmp_path.iterdir())
    reloaded = lora.load_adapter(_quantized_tiny_llama(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained)
    # Plain PEFT with the mapping registered on its config loads the same adapter.
    config = lora.register(peft.LoraConfig.from_pretrained(str(tmp_path)))
    raw = peft.PeftModel.from_pretrained(_quantized_tiny_llama(), str(tmp_path), config=config)
    with torch.no_grad():
        assert torch.equal(raw(input_ids=ids).logits, trained)


@needs_peft
def test_adapter_from_another_base_names_module_and_shapes(tmp_path):
    model = _lora_model(("q_proj",))
    model.save_pretrained(str(tmp_path))
    other = tiny_llama(hidden_size=96, intermediate_size=128)
    replace_linear(other, QuantConfig(bits=4, group_size=32), quantize=True)
    with pytest.raises(lora.LoRAError, match=r"model\.layers\.0\.self_attn\.q_proj is 96 -> 96 here, but the adapter's lora_A is \[4, 64\]"):
        lora.load_adapter(other, str(tmp_path))
    with pytest.raises(lora.LoRAError, match="no adapter_config.json"):
        lora.load_adapter(_quantized_tiny_llama(), str(tmp_path / "nowhere"))


@needs_peft
def test_bad_lora_requests_are_one_line_errors():
    with pytest.raises(lora.LoRAError, match=r"target modules \['qproj'\] match no Linear layer; the model's Linear layers are: "
                                             r"down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"):
        _lora_model(("qproj", "v_proj"))
    with pytest.raises(lora.LoRAError, match="matches no Linear layer"):
        _lora_model(r".*\.attn\.nothing")
    with pytest.raises(lora.LoRAError, match="rank must be a positive integer.*r=0"):
        _lora_model(r=0)
    with pytest.raises(ValueError, match="DoRA|use_dora"):
        _lora_model(use_dora=True)
    model = _lora_model()
    with pytest.raises(ValueError, match="cannot absorb"):
        model.merge_and_unload()


def test_without_peft_lora_says_how_to_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # `import peft` now raises ImportError
    with pytest.raises(lora.LoRAError, match=r"pip install 'bluelm-quant\[lora\]'"):
        lora.get_peft_model(_quantized_tiny_llama(), None)


@pytest.mark.slow  # a fresh interpreter imports torch and transformers: 10-40 s on the shared machine
def test_import_without_peft_works_and_says_how_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['peft'] = None\n"
            "import bluelm_quant\nfrom bluelm_quant import lora\n"
            "try:\n    lora.require_peft()\nexcept lora.LoRAError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'bluelm-quant[lora]'" in out


# --- fine-tuning ------------------------------------------------------------------------------

import json  # noqa: E402

from bluelm_quant import sft_data  # noqa: E402
from bluelm_quant.finetune import FinetuneConfig, FinetuneError, finetune  # noqa: E402
from bluelm_quant.saving import save_quantized  # noqa: E402

from tiny_models import byte_tokenizer  # noqa: E402

WORDS = ("cat", "dog", "sun", "moon", "tree", "fish", "bird", "rain")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    """A tiny 4-bit LLaMA directory (act-order layers included) with a byte-level tokenizer."""
    model = tiny_llama(vocab_size=258, seed=0)
    config = QuantConfig(bits=4, group_size=32, sym=False)
    replace_linear(model, config, quantize=True)
    for name, m in model.named_modules():  # act-order on the MLP: g_idx over a permuted column order
        if isinstance(m, QuantLinear) and name.endswith("up_proj"):
            m.g_idx = m.g_idx[torch.randperm(m.in_features, generator=torch.Generator().manual_seed(3))]
            m.post_init()
    path = str(tmp_path_factory.mktemp("tiny") / "q4")
    save_quantized(model, path, config, tokenizer=byte_tokenizer())
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    belle = [{"instruction": f"Say {w}", "input": "twice" if i % 2 else "", "output": f"{w} {w}."} for i, w in enumerate(WORDS)]
    return {
        "belle": _write_jsonl(d / "belle.jsonl", belle),
        "pr": _write_jsonl(d / "pr.json", [{"prompt": f"Name a {w}", "response": f"A {w}."} for w in WORDS]),
        "bluelm": _write_jsonl(d / "bluelm.json", [{"inputs": f"[|Human|]:Say {w}[|AI|]:", "targets": w} for w in WORDS]),
        "columns": _write_jsonl(d / "columns.jsonl", [{"question": f"Say {w}", "answer": w} for w in WORDS]),
        "empty": str((d / "empty.jsonl").write_text("\n") and d / "empty.jsonl"),
    }


def _cfg(qdir, train, out, **kw):
    base = dict(model=qdir, train_file=train, output_dir=str(out), lora_rank=4, lora_alpha=8, lora_dropout=0.1,
                seq_len=64, batch_size_per_device=2, gradient_accumulation_steps=2, max_steps=4, save_steps=2,
                learning_rate=1e-2, progress=False)
    base.update(kw)
    return FinetuneConfig(**base)


def _adapter_tensors(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_readers_take_each_record_format(data):
    tok = byte_tokenizer()
    assert sft_data.read_pairs(data["belle"])[1] == ("Say dog\ntwice", "dog dog.")
    assert sft_data.read_pairs(data["pr"])[0] == ("Name a cat", "A cat.")
    assert sft_data.read_pairs(data["columns"], "question", "answer")[0] == ("Say cat", "cat")
    pairs = sft_data.read_pairs(data["bluelm"])
    assert sft_data.resolve_style("auto", tok, "llama", pairs) == "raw"
    assert sft_data.resolve_style("auto", tok, "llama", sft_data.read_pairs(data["pr"])) == "plain"


def test_the_loss_counts_response_tokens_only(data):
    tok = byte_tokenizer()
    examples, style = sft_data.load_examples(data["pr"], tok, "llama", seq_len=64)
    e = examples[0]
    prompt = [tok.bos_token_id] + list(b"Name a cat\n")
    assert style == "plain" and e.input_ids == prompt + list(b"A cat.") + [tok.eos_token_id]
    assert e.labels == [sft_data.IGNORE] * len(prompt) + list(b"A cat.") + [tok.eos_token_id]
    short, _ = sft_data.load_examples(data["pr"], tok, "llama", seq_len=8)
    assert all(len(x.input_ids) <= 8 and x.response_tokens > 0 for x in short)
    bluelm, style = sft_data.load_examples(data["bluelm"], tok, "BlueLM", seq_len=64)
    assert style == "raw" and bluelm[0].input_ids[-4:] == list(b"cat") + [tok.eos_token_id]


def test_loss_sum_equals_the_loss_over_all_logits(data):
    import torch.nn.functional as F

    from bluelm_quant.finetune import loss_sum

    examples, _ = sft_data.load_examples(data["belle"], byte_tokenizer(), "llama", seq_len=64)
    batch = sft_data.collate(examples[:3], 257)
    model = tiny_llama(vocab_size=258)
    total, count = loss_sum(model, batch, torch.device("cpu"))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, 258), batch["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
    assert count == sum(e.response_tokens for e in examples[:3])
    torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-5)


def test_bad_data_is_a_one_line_error(data):
    with pytest.raises(sft_data.FinetuneDataError, match=r"no column 'prompt'.*columns found: answer, question"):
        sft_data.read_pairs(data["columns"], "prompt", "answer")
    with pytest.raises(sft_data.FinetuneDataError, match="cannot tell the record format.*'answer', 'question'"):
        sft_data.read_pairs(data["columns"])
    with pytest.raises(sft_data.FinetuneDataError, match="holds no records"):
        sft_data.read_pairs(data["empty"])


@needs_peft
def test_finetune_lowers_the_loss_and_writes_peft_adapters(qdir, data, tmp_path):
    from bluelm_quant.loading import load_quantized

    report = finetune(_cfg(qdir, data["belle"], tmp_path / "run", dev_file=data["belle"], max_steps=6, save_steps=3))
    assert report["steps"] == 6 and report["dev_loss_final"] < report["dev_loss_base"]
    assert sum(report["losses"][-2:]) < sum(report["losses"][:2])
    out = tmp_path / "run"
    assert {"adapter_config.json", "adapter_model.safetensors", "checkpoint-3", "checkpoint-6"} <= set(os.listdir(out))
    final, last = _adapter_tensors(str(out)), _adapter_tensors(str(out / "checkpoint-6"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    # The saved adapter on a freshly loaded base reproduces the dev loss the run measured.
    model = lora.load_adapter(load_quantized(qdir, dtype=torch.float32), str(out))
    examples, _ = sft_data.load_examples(data["belle"], byte_tokenizer(), "llama", seq_len=64)
    from bluelm_quant.finetune import dev_loss

    assert dev_loss(model, examples, 2, 257, torch.device("cpu")) == pytest.approx(report["dev_loss_final"], rel=1e-5)


@needs_peft
def test_resume_gives_the_adapter_of_an_uninterrupted_run(qdir, data, tmp_path):
    finetune(_cfg(qdir, data["belle"], tmp_path / "whole"))

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(qdir, data["belle"], tmp_path / "cut"), on_step=stop)
    assert sorted(os.listdir(tmp_path / "cut")) == ["checkpoint-2"]  # step 3 never reached a checkpoint
    with pytest.raises(FinetuneError, match="--resume"):
        finetune(_cfg(qdir, data["belle"], tmp_path / "cut"))
    from bluelm_quant.workdir import ResumeError

    with pytest.raises(ResumeError, match="learning_rate"):
        finetune(_cfg(qdir, data["belle"], tmp_path / "cut", resume=True, learning_rate=5e-3))
    report = finetune(_cfg(qdir, data["belle"], tmp_path / "cut", resume=True))
    assert report["steps"] == 4 and len(report["losses"]) == 4
    a, b = _adapter_tensors(str(tmp_path / "whole")), _adapter_tensors(str(tmp_path / "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_peft
def test_gradient_checkpointing_trains_the_same_adapter(qdir, data, tmp_path):
    plain = finetune(_cfg(qdir, data["pr"], tmp_path / "a", max_steps=2, lora_dropout=0.0))
    ckpt = finetune(_cfg(qdir, data["pr"], tmp_path / "b", max_steps=2, lora_dropout=0.0, gradient_checkpointing=True))
    assert ckpt["losses"] == pytest.approx(plain["losses"], rel=1e-5)
    a, b = _adapter_tensors(str(tmp_path / "a")), _adapter_tensors(str(tmp_path / "b"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5) for k in a)


@needs_peft
def test_merged_model_equals_base_plus_adapter(qdir, data, tmp_path):
    from transformers import AutoModelForCausalLM

    from bluelm_quant.loading import load_quantized
    from bluelm_quant.merge import merge_adapter

    finetune(_cfg(qdir, data["pr"], tmp_path / "run", max_steps=3, lora_target="q_proj,up_proj,down_proj"))
    tuned = lora.load_adapter(load_quantized(qdir, dtype=torch.float32), str(tmp_path / "run"))
    merge_adapter(qdir, str(tmp_path / "run"), str(tmp_path / "merged"), dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert not hasattr(merged.config, "quantization_config")
    ids = tokens(batch=2, seq=16, vocab=258, seed=5)
    with torch.no_grad():
        want, got = tuned(input_ids=ids).logits, merged(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
    with torch.no_grad(), tuned.disable_adapter():
        untuned = tuned(input_ids=ids).logits
    assert (untuned - want).abs().max() > 100 * (got - want).abs().max()  # the adapter mattered


@needs_peft
def test_merge_tool_requantizes_with_the_base_settings(qdir, data, tmp_path, capsys):
    from bluelm_quant.cli import merge_adapter
    from bluelm_quant.modeldir import ModelDir

    finetune(_cfg(qdir, data["pr"], tmp_path / "run", max_steps=1))
    out = tmp_path / "merged"
    code, printed = _run_cli(merge_adapter.main, ["--model", qdir, "--adapter", str(tmp_path / "run"), "--out", str(out),
                                                  "--requantize", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "-q"], capsys)
    assert code == 0, printed.err
    merged, requantized = ModelDir(str(out)), ModelDir(str(out) + "-gptq")
    assert not merged.is_quantized and requantized.is_quantized
    base = ModelDir(qdir).quant
    assert (requantized.quant.bits, requantized.quant.group_size, requantized.quant.sym) == (base.bits, base.group_size, base.sym)


# --- the tools ---------------------------------------------------------------------------------


def _run_cli(main, argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_finetune_without_peft_is_one_line_before_the_model_loads(qdir, data, tmp_path, capsys, monkeypatch):
    from bluelm_quant.cli import finetune as cli

    monkeypatch.setitem(__import__("sys").modules, "peft", None)  # `import peft` now raises ImportError
    code, out = _run_cli(cli.main, ["--model", qdir, "--train_file", data["belle"], "--output_dir", str(tmp_path / "o"),
                                    "--max_steps", "1", "-q"], capsys)
    lines = out.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "pip install 'bluelm-quant[lora]'" in lines[0], out.err
    assert not (tmp_path / "o").exists()


@needs_peft
def test_finetune_tool_bad_input_is_one_line(qdir, data, tmp_path, capsys):
    from bluelm_quant.cli import finetune as cli

    base = ["--model", qdir, "--output_dir", str(tmp_path / "o"), "--max_steps", "1", "-q"]
    cases = [
        (["--train_file", data["columns"], "--prompt_column", "prompt", "--response_column", "answer"],
         r"no column 'prompt' \(columns found: answer, question\)"),
        (["--train_file", data["empty"]], "holds no records"),
        (["--train_file", data["belle"], "--lora_rank", "0"], "lora_rank=0 must be a positive integer"),
        (["--train_file", data["belle"], "--lora_target", "qkv"],
         r"target modules \['qkv'\] match no Linear layer; the model's Linear layers are: down_proj, gate_proj, k_proj, "
         r"lm_head, o_proj, q_proj, up_proj, v_proj \(e\.g\. model\.layers\.0\.self_attn\.q_proj\)"),
    ]
    for extra, message in cases:
        code, out = _run_cli(cli.main, base + extra, capsys)
        lines = out.err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.err
        assert re.search(message, lines[0]), lines[0]


@needs_peft
def test_adapter_flags_and_a_foreign_adapter(qdir, data, tmp_path, capsys):
    from bluelm_quant.cli import eval_ppl

    finetune(_cfg(qdir, data["pr"], tmp_path / "run", max_steps=1))
    text = tmp_path / "t.txt"
    text.write_text("A cat. A dog. A sun. " * 20)
    code, out = _run_cli(eval_ppl.main, ["--model", qdir, "--text", str(text), "--seqlen", "32", "--max-windows", "2",
                                          "--adapter", str(tmp_path / "run"), "--device", "cpu"], capsys)
    assert code == 0 and "perplexity" in out.out and "+ adapter" in out.err
    other = tmp_path / "other"
    model = tiny_llama(vocab_size=258, hidden_size=96, seed=1)
    replace_linear(model, QuantConfig(bits=4, group_size=32), quantize=True)
    save_quantized(model, str(other), QuantConfig(bits=4, group_size=32), tokenizer=byte_tokenizer())
    code, out = _run_cli(eval_ppl.main, ["--model", str(other), "--text", str(text), "--seqlen", "32", "--max-windows", "1",
                                          "--adapter", str(tmp_path / "run"), "--device", "cpu"], capsys)
    assert code == 2 and len(out.err.strip().splitlines()) == 1
    assert re.search(r"model\.layers\.0\.mlp\.down_proj is 128 -> 96 here, but the adapter's lora_B is \[64, 4\] "
                     r"\(expected \[96, r\]\); the adapter was trained on .*q4", out.err), out.err


@needs_peft
@pytest.mark.slow  # a dozen child processes, each importing torch, transformers and peft
def test_memory_bench_runs_at_toy_size(tmp_path, capsys):
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "bench_finetune_memory.py")
    spec = importlib.util.spec_from_file_location("bench_finetune_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "r.json"
    assert bench.main(["--dir", str(tmp_path / "ck"), "--hidden", "256", "--intermediate", "512", "--heads", "4",
                       "--vocab", "1000", "--seq-len", "32", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert set(rows) == {f"{k} ckpt={c}" for k in ("4-bit", "bf16") for c in (False, True)}
    assert rows["4-bit ckpt=False"]["weights_per_layer"] < rows["bf16 ckpt=False"]["weights_per_layer"] / 3
    assert "Estimate for a whole 32-layer 7B" in capsys.readouterr().out


@needs_peft
def test_chat_fuses_projections_only_without_an_adapter(qdir, data, tmp_path):
    """bluelm-chat fuses q/k/v and gate/up for speed (fuse.py), except under an adapter, whose LoRA
    layers wrap the separate Linears."""
    from bluelm_quant.cli import chat as chat_cli
    from bluelm_quant.fuse import FusedMember

    finetune(_cfg(qdir, data["pr"], tmp_path / "run", max_steps=1))
    plain, _ = chat_cli.load_chat_model(chat_cli.parser().parse_args(["--model", qdir]), "cpu")
    assert isinstance(plain.model.layers[0].self_attn.q_proj, FusedMember)
    tuned, _ = chat_cli.load_chat_model(chat_cli.parser().parse_args(["--model", qdir, "--adapter", str(tmp_path / "run")]),
                                        "cpu")
    q = tuned.get_base_model().model.layers[0].self_attn.q_proj
    assert not isinstance(q, FusedMember) and hasattr(q, "lora_A")
