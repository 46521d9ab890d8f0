"""qweight in column blocks (bluelm_quant.column_blocks, issue 14): every CPU kernel body reads them
and gives the standard layout's outputs bit for bit, everything else sees the standard layout
(state_dict, dequantize, column slices, a move off the CPU), the decode path uses them with the same
tokens, and bad blocks are refused with a message."""
import copy
import os

import pytest
import torch
from safetensors.torch import load_file

from bluelm_quant import column_blocks, cpu_decode, extension, ops
from bluelm_quant.config import QuantConfig
from bluelm_quant.extension import QuantOpError
from bluelm_quant.fuse import fuse_projections
from bluelm_quant.generate import Generator
from bluelm_quant.loading import load_quantized
from bluelm_quant.nn import QuantLinear
from bluelm_quant.quantizer import rtn
from bluelm_quant.saving import save_quantized

from tiny_models import save_tiny_4bit, tokens

pytestmark = [pytest.mark.skipif(extension.quant_cuda() is None, reason="needs the compiled quant_cuda extension"),
              pytest.mark.usefixtures("one_thread")]

DETECTED_ISA = extension.quant_cuda().cpu_isa_detected if extension.quant_cuda() is not None else "scalar"
CPU_ISAS = ops.CPU_ISAS[ops.CPU_ISAS.index(DETECTED_ISA):]  # the bodies this CPU runs
GROUP = 32


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    assert ops.set_cpu_isa(request.param) == request.param
    yield request.param
    ops.set_cpu_isa("best")


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return save_tiny_4bit(str(tmp_path_factory.mktemp("blocks") / "q"), seed=11, group_size=GROUP)


@pytest.fixture
def tiny_widths(monkeypatch):
    """block_width's thresholds scaled to the tiny model (64-256 columns): blocks of 16 columns."""
    monkeypatch.setattr(column_blocks, "MIN_COLUMNS", 64)
    monkeypatch.setattr(column_blocks, "MIN_BLOCK", 16)
    monkeypatch.setattr(column_blocks, "MAX_BLOCK", 64)
    monkeypatch.setattr(column_blocks, "MIN_TASKS", 2)


def quant_linear(n, k, act_order=False, dtype=torch.float32, seed=0) -> QuantLinear:
    gen = torch.Generator().manual_seed(seed)
    qw = rtn(torch.randn(n, k, generator=gen), QuantConfig(group_size=GROUP, sym=False))
    if act_order:
        qw.g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // GROUP).to(torch.int32)
    return QuantLinear.from_quantized(qw, GROUP, bias=torch.randn(n, generator=gen), dtype=dtype)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_kernel_body_reads_column_blocks_bit_for_bit(cpu_isa, act_order, dtype):
    for n, k, block in ((192, 256, 64), (96, 128, 24)):
        plain = quant_linear(n, k, act_order, dtype)
        blocked = copy.deepcopy(plain)
        blocked.use_column_blocks(block)
        assert blocked.kernel_block == block and not torch.equal(blocked.qweight, plain.qweight)  # the words moved
        with torch.no_grad():
            # 1 row: the M=1 body; 3 and 17: small batches (AMX from 2 rows); 300: the dequantize path
            # where the body hands over to it. Twice: the checked call, then the layer's plan.
            for rows in (1, 3, 17, 300, 1, 3):
                x = torch.randn(rows, k).to(dtype)
                assert torch.equal(blocked(x), plain(x)), (cpu_isa, n, block, rows)
        assert isinstance(blocked._plan, ops.GemmPlan) and blocked._plan.qweight.shape == (n // block, k // 8, block)


@pytest.mark.parametrize("n,block", [(4096, None), (5504, 2752)])
def test_the_kernel_takes_blocks_at_7b_widths(n, block):
    """BlueLM-7B's widths at a small K (column_blocks' own block for 4096; 2752, gate/up's, for 5504):
    one row reads whole blocks, more rows split each into tasks of at most 768 columns."""
    k = 256
    plain = quant_linear(n, k, seed=3)
    blocked = copy.deepcopy(plain)
    blocked.use_column_blocks(block or column_blocks.block_width(n))
    with torch.no_grad():
        for rows in (1, 4, 1):
            x = torch.randn(rows, k)
            assert torch.equal(blocked(x), plain(x))


def test_compiled_calls_take_blocked_layers():
    """torch.compile traces the op on the [N/W, K/8, W] view (the fake op's shapes), as a compiled decode
    step does for a 4-bit lm_head or a bf16 model's layers (those run outside the decode-layer ops)."""
    plain = quant_linear(128, 256, seed=4)
    blocked = copy.deepcopy(plain)
    blocked.use_column_blocks(32)
    x = torch.randn(1, 256)
    with torch.no_grad():
        blocked(x)  # the checked call, which makes the plan
        step = torch.compile(lambda t: blocked(t), backend="aot_eager", fullgraph=True)
        assert torch.equal(step(x), plain(x))


def test_more_threads_than_blocks_split_the_blocks(monkeypatch):
    """With fewer blocks than kernel threads, a one-row call cuts each block into tasks: the same outputs.
    (One block of a 64 KB layer, so that 2 threads are enough to split it.)"""
    plain = quant_linear(256, 512, seed=5)
    blocked = copy.deepcopy(plain)
    blocked.use_column_blocks(256)
    x = torch.randn(1, 512)
    with torch.no_grad():
        want = plain(x)
        for threads in (1, 2, 8):
            ops.set_kernel_threads(threads)
            try:
                assert torch.equal(blocked(x), want), threads
            finally:
                ops.set_kernel_threads(0)


def test_blocking_never_rewrites_a_tensor_someone_else_holds():
    plain = quant_linear(96, 128, seed=6)
    before = plain.state_dict()
    snapshot = {k: t.clone() for k, t in before.items()}
    twin = QuantLinear(128, 96, 4, GROUP, bias=True, dtype=torch.float32)
    twin.load_state_dict(before, assign=True)  # shares plain's tensors
    plain.use_column_blocks(32)
    assert all(torch.equal(before[k], snapshot[k]) for k in before)
    x = torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(twin(x), plain(x))
    with pytest.raises(ValueError, match="CPU kernel layout"):
        quant_linear(96, 128).to("meta").use_column_blocks(32)


def test_block_width_rule():
    # BlueLM-7B: o and down (4096), fused q/k/v (12288), fused gate/up (22016); LLaMA-3-8B's MLP (14336)
    assert [column_blocks.block_width(n) for n in (4096, 12288, 22016, 11008, 14336)] == [1024, 1024, 2752, 2752, 1024]
    assert column_blocks.block_width(3072) is None  # narrow: the standard layout streams as well
    assert column_blocks.block_width(4160) is None  # 64 x 65: no block in [1024, 4096] divides it


def test_a_blocked_layer_is_the_standard_one_to_everything_but_the_kernel():
    plain = quant_linear(96, 128, act_order=True, seed=1)
    blocked = copy.deepcopy(plain)
    blocked.use_column_blocks(32)
    want, got = plain.state_dict(), blocked.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(blocked.dequantize(), plain.dequantize())
    layer, ref = blocked.quant_layer(), plain.quant_layer()
    for start, stop in ((0, 96), (0, 32), (8, 40), (24, 88), (64, 96)):  # inside a block, across blocks
        assert torch.equal(layer.column_qweight(start, stop), ref.qweight[:, start:stop])
        assert torch.equal(ops.dequantize_columns(layer, start, stop, torch.float32),
                           ops.dequantize_columns(ref, start, stop, torch.float32))
    x = torch.randn(2, 128, requires_grad=True)  # the reference path (x needs a gradient)
    assert torch.equal(ops.gemm(x, layer), ops.gemm(x, ref))
    blocked.use_column_blocks(None)
    assert blocked.kernel_block is None and torch.equal(blocked.qweight, plain.qweight)


def test_moving_off_the_cpu_goes_back_to_the_plain_layout():
    plain = quant_linear(64, 128, seed=2)
    blocked = copy.deepcopy(plain)
    blocked.use_column_blocks(16)
    blocked.to("meta")  # the same path as .cuda(): column blocks are the CPU kernel's alone
    assert blocked.kernel_block is None and blocked.qweight.is_meta
    if torch.cuda.is_available():
        on_gpu = copy.deepcopy(plain)
        on_gpu.use_column_blocks(16)
        on_gpu.cuda()
        assert on_gpu.kernel_block is None and torch.equal(on_gpu.qweight.cpu(), plain.qweight)


def test_bad_blocks_are_refused_with_a_message():
    plain = quant_linear(96, 128)
    with pytest.raises(QuantOpError, match="multiple of 8 dividing N=96"):
        ops.to_column_blocks(plain.qweight, 36)
    with pytest.raises(QuantOpError, match="multiple of 8 dividing N=96"):
        plain.use_column_blocks(20)
    assert plain.kernel_block is None
    op = torch.ops.bluelm_quant
    blocks = plain.qweight.view(16, 12, 8)  # [K/8, N/W, W]: 12 rows is not K/8
    with pytest.raises(RuntimeError, match="column blocks"):
        op.dequantize_4bit(blocks.permute(1, 0, 2).contiguous(), plain.qzeros, plain.scales, GROUP)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        op.gemm_4bit(torch.randn(1, 128), plain.qweight.view(16, 32, 3), plain.qzeros, plain.scales, None, GROUP, None)


def test_decode_path_uses_blocks_and_keeps_logits_and_tokens(saved_tiny, tiny_widths):
    reference = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(reference)
    cpu_decode.enable_decode_layers(reference)
    fast = load_quantized(saved_tiny, dtype=torch.float32)
    fused, blocked, enabled = cpu_decode.prepare_cpu_decode(fast)
    assert (fused, blocked, enabled) == (4, 8, 2)  # q/k/v, o, gate/up and down of both layers
    assert all(m.kernel_block for m in fast.modules() if isinstance(m, QuantLinear))
    ids = tokens(batch=1, seq=9)
    with torch.inference_mode():
        assert torch.equal(fast(ids).logits, reference(ids).logits)  # the prompt (prefill rows)
        want = Generator(reference, max_len=24).generate(ids, 12).tokens
    got = Generator(fast, max_len=24)
    assert torch.equal(got.generate(ids, 12).tokens, want)
    with torch.profiler.profile() as prof:
        got.generate(ids, 4)
    assert [e.name for e in prof.events()].count("bluelm_quant::decode_qkv") == 2 * 3  # the steps ran the ops


def test_prepare_blocks_the_packed_tensors_in_place(saved_tiny, tiny_widths):
    """After fusing (which packs the kernels' tensors into a new arena) the blocks are written where the
    tensors are: no second copy of the weights, and the arena stays."""
    model = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(model)
    before = {name: m.qweight.data_ptr() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert column_blocks.use_column_blocks(model, in_place=True) == 8
    after = {name: m.qweight.data_ptr() for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert after == before


def test_a_tensor_two_layers_share_is_never_blocked_in_place():
    a = quant_linear(64, 128, seed=8)
    b = QuantLinear(128, 64, 4, GROUP, bias=True, dtype=torch.float32)
    b.load_state_dict(a.state_dict(), assign=True)
    plain = a.qweight.clone()
    assert column_blocks.use_column_blocks(torch.nn.ModuleList([a, b]), in_place=True) == 0  # too narrow
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(column_blocks, "MIN_COLUMNS", 64)
        mp.setattr(column_blocks, "MIN_BLOCK", 16)
        mp.setattr(column_blocks, "MIN_TASKS", 2)
        shared = a.qweight
        assert column_blocks.use_column_blocks(torch.nn.ModuleList([a, b]), in_place=True) == 2
    assert torch.equal(shared, plain)  # the shared tensor untouched: each layer got its own blocks
    x = torch.randn(1, 128)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_a_blocked_model_saves_the_checkpoint_it_was_loaded_from(saved_tiny, tiny_widths, tmp_path):
    model = load_quantized(saved_tiny, dtype=torch.float32)
    # q, o, gate, up and down of both layers; k and v (32 columns) are below MIN_COLUMNS and stay plain
    assert column_blocks.use_column_blocks(model) == 10
    config = QuantConfig(bits=4, group_size=GROUP, sym=False)
    save_quantized(model, str(tmp_path / "again"), config)
    files = sorted(f for f in os.listdir(saved_tiny) if f.endswith(".safetensors"))
    for f in files:
        want, got = load_file(os.path.join(saved_tiny, f)), load_file(str(tmp_path / "again" / f))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
