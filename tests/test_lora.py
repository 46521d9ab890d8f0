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
