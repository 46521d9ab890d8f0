import pytest
import torch
from torch import nn

from bluelm_quant import extension, ops
from bluelm_quant.config import QuantConfig
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.quantizer import rtn

from tiny_models import tiny_llama, tokens


def _reference(layer: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    w = layer.dequantize(torch.float64)  # [N, K]
    y = x.double() @ w.T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5,), (2, 3), (2, 2, 3)])
def test_forward_any_batch_shape_and_dtype(dtype, shape):
    lin = nn.Linear(256, 64, bias=True)
    q = QuantLinear.from_linear(lin, QuantConfig(group_size=64, sym=False), dtype=dtype)
    x = torch.randn(*shape, 256).to(dtype)
    y = q(x)
    assert y.shape == (*shape, 64) and y.dtype == dtype
    tol = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    torch.testing.assert_close(y.double(), _reference(q, x), atol=tol * 10, rtol=tol)


def test_act_order_g_idx_is_honoured():
    k, n, gs = 128, 32, 32
    w = torch.randn(n, k)
    qw = rtn(w, QuantConfig(group_size=gs))
    perm = torch.randperm(k)
    qw.g_idx = (torch.argsort(perm) // gs).to(torch.int32)  # groups in a permuted order
    q = QuantLinear.from_quantized(qw, gs, dtype=torch.float32)
    x = torch.randn(3, k)
    torch.testing.assert_close(q(x).double(), x.double() @ qw.dequantize().double().T, atol=1e-4, rtol=1e-4)


def test_from_linear_is_close_to_the_float_layer():
    lin = nn.Linear(512, 128, bias=False)
    q = QuantLinear.from_linear(lin, QuantConfig(bits=8, group_size=128))
    x = torch.randn(4, 512)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.01


def test_standard_buffer_shapes():
    q = QuantLinear(576, 1536, bits=4, group_size=128, bias=True, dtype=torch.float16)
    sd = q.state_dict()
    assert sd["qweight"].shape == (72, 1536) and sd["qweight"].dtype == torch.int32
    assert sd["qzeros"].shape == (5, 192) and sd["qzeros"].dtype == torch.int32
    assert sd["scales"].shape == (5, 1536) and sd["scales"].dtype == torch.float16
    assert sd["g_idx"].shape == (576,) and sd["g_idx"].dtype == torch.int32
    assert sd["bias"].shape == (1536,)


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiples of 8"):
        QuantLinear(100, 64)
    with pytest.raises(ValueError, match="not supported"):
        QuantLinear(64, 64, bits=5)
    q = QuantLinear.from_linear(nn.Linear(64, 64), QuantConfig(group_size=32))
    with pytest.raises(ops.QuantOpError, match="float"):
        q(torch.ones(2, 64, dtype=torch.int64))
    with pytest.raises(ops.QuantOpError, match="in_features=64"):
        q(torch.ones(2, 32))


def test_replace_linear_rtn_keeps_lm_head_and_tracks_logits():
    model = tiny_llama()
    ids = tokens()
    before = model(ids).logits
    names = replace_linear(model, QuantConfig(bits=8, group_size=32), quantize=True)
    assert "lm_head" not in names and len(names) == 14
    assert isinstance(model.lm_head, nn.Linear)
    after = model(ids).logits
    assert (after - before).abs().max() < 0.05 * before.abs().max()


def _act_order_layer(k=256, n=48, gs=64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qw = rtn(torch.randn(n, k, generator=gen), QuantConfig(group_size=gs, sym=False))
    qw.g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
    return qw, QuantLinear.from_quantized(qw, gs, bias=torch.randn(n, generator=gen), dtype=torch.float32)


def test_act_order_keeps_one_copy_and_saves_the_standard_layout():
    from bluelm_quant.packing import pack_qweight

    qw, q = _act_order_layer()
    standard = pack_qweight(qw.codes.T, 4)
    if extension.quant_cuda() is not None:  # the kernel layout: rows regrouped in place of the checkpoint's order
        assert q.kernel_perm is not None and not torch.equal(q.qweight, standard)
    assert sorted(n for n, _ in q.named_buffers()) == sorted(
        ["qweight", "qzeros", "scales", "g_idx", "bias"] + (["kernel_perm"] if q.kernel_perm is not None else []))
    state = q.state_dict()
    assert set(state) == {"qweight", "qzeros", "scales", "g_idx", "bias"}
    assert torch.equal(state["qweight"], standard)  # bit for bit the checkpoint's order
    fresh = QuantLinear(256, 48, 4, 64, bias=True, dtype=torch.float32)
    fresh.load_state_dict(state)
    x = torch.randn(4, 256)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
    assert torch.equal(fresh.state_dict()["qweight"], standard)
    torch.testing.assert_close(q.dequantize(), qw.dequantize(), rtol=0, atol=0)


def test_a_partial_state_dict_leaves_the_kernel_layout_alone():
    """load_state_dict(strict=False) without this layer's tensors (PEFT loading adapters) must not
    repack rows that are already in the kernel's order."""
    _, q = _act_order_layer(seed=1)
    model = nn.Sequential(q)
    x = torch.randn(2, 256)
    with torch.no_grad():
        before = model(x)
        model.load_state_dict({}, strict=False)
        assert torch.equal(model(x), before)
