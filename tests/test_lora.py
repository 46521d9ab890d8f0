"""LoRA on 4-bit models: the input gradient of QuantLinear, PEFT, training, saving, merging."""
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
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    _, checkpointed = _embedding_grad(model, ids)
    assert model.is_gradient_checkpointing
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

peft = pytest.importorskip("peft")
from bluelm_quant import lora  # noqa: E402
from bluelm_quant.lora_layer import QuantLoraLinear  # noqa: E402


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


def test_peft_wraps_quant_linears_by_name():
    model = _lora_model(("q_proj", "v_proj"))
    wrapped = {n for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}
    assert wrapped == {f"base_model.model.model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if p.requires_grad)


def test_all_linear_takes_every_quant_linear_but_the_head():
    model = _lora_model("all-linear")
    wrapped = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, QuantLoraLinear)}
    assert wrapped == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert isinstance(model.base_model.model.lm_head, nn.Linear)


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


def test_adapter_from_another_base_names_module_and_shapes(tmp_path):
    model = _lora_model(("q_proj",))
    model.save_pretrained(str(tmp_path))
    other = tiny_llama(hidden_size=96, intermediate_size=128)
    replace_linear(other, QuantConfig(bits=4, group_size=32), quantize=True)
    with pytest.raises(lora.LoRAError, match=r"model\.layers\.0\.self_attn\.q_proj is 96 -> 96 here, but the adapter's lora_A is \[4, 64\]"):
        lora.load_adapter(other, str(tmp_path))
    with pytest.raises(lora.LoRAError, match="no adapter_config.json"):
        lora.load_adapter(_quantized_tiny_llama(), str(tmp_path / "nowhere"))


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


def test_import_without_peft_works_and_says_how_to_install():
    import subprocess
    import sys

    code = ("import sys; sys.modules['peft'] = None\n"
            "import bluelm_quant\nfrom bluelm_quant import lora\n"
            "try:\n    lora.require_peft()\nexcept lora.LoRAError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install 'bluelm-quant[lora]'" in out
