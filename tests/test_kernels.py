"""quant_cuda kernels (torch.ops.bluelm_quant) against a float64 dequantize-then-matmul oracle.

Seeded random codes, zeros, scales and activations; the oracle is
ops.gemm_reference(x.double(), ..., scales.double()), i.e. exact products summed in float64.

Tolerance (`tolerance` below): the AVX2 and scalar CPU bodies accumulate in fp32 and sum
each group as sum(code * x) - zero * sum(x), terms of magnitude up to 16 * scale * |x|
(codes and zeros lie in 0..16). A float sum of n terms is off by at most
(n - 1) * eps * sum |terms|: per output that is at most (group_size + groups + 8) * 2^-24 *
(|x| @ 16 * scale), plus one rounding to the output dtype (2^-24 fp32, 2^-11 fp16, 2^-8
bf16) of |y|. The AVX-512 body sums exactly in integers but first rounds each activation
to a 24-bit grid of its group, moving it by at most 1.004 * 2^-24 * max|x| of the group
(quant_cuda/cpu_kernels.h), i.e. at most 1.004 * group_size * 2^-24 * (|x| @ 16 * scale)
over a group, in place of the group_size roundings of the fp32 sum; hence the 1.004. On
4096 x 11008 that is ~1e-5 of sum |x||w|, below the change one wrong 4-bit code makes on
average, so a mis-unpacked nibble or a wrong group fails. CUDA kernels may round the
dequantized weight to fp16/bf16 before multiplying: one more eps_half * (|x| @ |w|) there.

CPU tests run on every body this CPU supports (`cpu_isa` fixture: amx, avx512, avx2, scalar).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest
import torch

from bluelm_quant import cpu_settings, extension, int8_ops, ops
from bluelm_quant.nn import QuantLinear
from bluelm_quant.packing import pack_qzeros

OPS = torch.ops.bluelm_quant if hasattr(torch.ops, "bluelm_quant") else None
CUDA = torch.cuda.is_available() and extension.quant_cuda() is not None and extension.quant_cuda().with_cuda
OUT_EPS = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
DETECTED_ISA = extension.quant_cuda().cpu_isa_detected if extension.quant_cuda() is not None else "scalar"
CPU_ISAS = ops.CPU_ISAS[ops.CPU_ISAS.index(DETECTED_ISA):]  # the bodies this CPU runs


@pytest.fixture(params=CPU_ISAS)
def cpu_isa(request):
    """Run the test on one CPU body, then restore the default."""
    if extension.quant_cuda() is None:
        pytest.skip("quant_cuda is not built")
    assert ops.set_cpu_isa(request.param) == request.param
    yield request.param
    ops.set_cpu_isa("best")


# --- helpers ---------------------------------------------------------------------------------


def make_layer(k, n, group_size, sym=False, act_order=False, dtype=torch.float32, seed=0, device="cpu"):
    """Random 4-bit layer in the checkpoint layout: qweight, qzeros, scales, g_idx, group size."""
    gen = torch.Generator().manual_seed(seed)
    gs = k if group_size == -1 else group_size
    groups = -(-k // gs)
    # Uniformly random words are uniformly random codes (packing.py's tests cover packing).
    qweight = (torch.randint(0, 2**32, (k // 8, n), generator=gen, dtype=torch.int64) - 2**31).to(torch.int32)
    zeros = torch.full((groups, n), 8, dtype=torch.int32) if sym else torch.randint(1, 16, (groups, n), generator=gen, dtype=torch.int32)
    scales = (torch.rand(groups, n, generator=gen) * 0.02 + 0.002).to(dtype)
    g_idx = (torch.arange(k) // gs).to(torch.int32)
    if act_order:  # GPTQ act-order: qweight stays in input order, g_idx is permuted
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    t = (qweight, pack_qzeros(zeros, 4), scales, g_idx)
    return tuple(v.to(device) for v in t) + (gs,)


def activations(m, k, dtype, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).to(device)


def oracle(x, layer, bias=None, rows=1024):
    """ops.gemm_reference in float64, over blocks of input rows (keeps 7B shapes fast)."""
    qw, qz, s, g, _ = layer
    x64, s64 = x.double(), s.double()
    y = sum(
        ops.gemm_reference(x64[:, r : r + rows], qw[r // 8 : (r + rows) // 8], qz, s64, g[r : r + rows], 4)
        for r in range(0, qw.shape[0] * 8, rows)
    )
    return y if bias is None else y + bias.double()


def tolerance(x, layer, out_dtype, ref, weight_eps=0.0):
    qw, qz, s, g, gs = layer
    k = qw.shape[0] * 8
    # |x| @ (16 * scale[g_idx]): |code| and |zero| <= 16; summed per group first.
    xg = torch.zeros(x.shape[0], s.shape[0], dtype=torch.float64, device=x.device)
    xg.index_add_(1, g.long(), x.double().abs())
    mag = xg @ (s.double().abs() * 16)
    acc_terms = 1.004 * gs + s.shape[0] + 8
    return acc_terms * 2.0**-24 * mag + weight_eps * mag + OUT_EPS[out_dtype] * ref.abs() + 1e-30 * k


def assert_matches_oracle(y, x, layer, bias=None, weight_eps=0.0, ref=None):
    ref = oracle(x, layer, bias) if ref is None else ref
    assert y.shape == ref.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all(), "kernel output has NaN/inf (unwritten output?)"
    err = (y.double() - ref).abs()
    tol = tolerance(x, layer, y.dtype, ref, weight_eps)
    worst = (err / tol).max().item()
    assert worst <= 1.0, f"max error {err.max().item():.3e} is {worst:.2f}x the tolerance (shape {tuple(y.shape)})"


def prepared(layer, bias=None):
    qw, qz, s, g, _ = layer
    q = ops.prepare(qw, qz, s, g, 4, bias)
    assert q.group_size is not None, "prepare refused a layout the kernels support"
    return q


def run_gemm(x, layer, bias=None):
    return ops.gemm(x, prepared(layer, bias))


# --- the build --------------------------------------------------------------------------------


def test_extension_is_built_and_used():
    assert not ops.backend().startswith("reference"), f"quant_cuda is not built: {ops.backend()}"
    import quant_cuda

    assert quant_cuda.__file__.endswith(".so"), f"`import quant_cuda` found {quant_cuda.__file__}"
    assert quant_cuda.get_cpu_isa() in ops.CPU_ISAS and quant_cuda.cpu_isa_detected in ops.CPU_ISAS


def test_missing_extension_is_reported(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "quant_cuda", None)  # makes `import quant_cuda` raise
    module, why = extension._load_extension()
    assert module is None and "quant_cuda" in why
    monkeypatch.setattr(extension, "_ext", None)
    monkeypatch.setattr(extension, "_ext_error", why)
    monkeypatch.setattr(extension, "_warned", set())
    assert ops.backend().startswith("reference (extension not built: ")
    layer = make_layer(64, 8, 32)
    x = activations(2, 64, torch.float32)
    with caplog.at_level("WARNING", logger="bluelm_quant.ops"):
        y = run_gemm(x, layer)
    assert "not usable" in caplog.text
    assert_matches_oracle(y, x, layer)


# --- dequantize --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,n,group_size,sym", [(576, 24, 128, False), (8, 8, -1, True), (256, 40, 32, False), (1024, 64, 64, True)])
def test_dequantize_is_bit_exact(k, n, group_size, sym, dtype):
    qw, qz, s, g, gs = make_layer(k, n, group_size, sym, dtype=dtype)
    w = OPS.dequantize_4bit(qw, qz, s, gs, None)
    assert w.dtype == dtype and w.shape == (k, n)
    assert torch.equal(w, ops.dequantize_reference(qw, qz, s, g, 4, dtype))
    # Output dtype differing from the scales': scales are converted first.
    w32 = OPS.dequantize_4bit(qw, qz, s, gs, torch.float32)
    assert torch.equal(w32, ops.dequantize_reference(qw, qz, s.float(), g, 4, torch.float32))


# --- gemm against the oracle -------------------------------------------------------------------

# (K, N, group_size, sym, act_order, bias): partial last group (576 / 128), N = 8 and 24
# (8-column tails only), K = 8, per-channel, act-order, sym and asym.
LAYERS = [
    (576, 24, 128, False, False, True),
    (8, 8, -1, True, False, False),
    (64, 8, 32, False, True, True),
    (256, 40, 64, True, True, False),
    (512, 72, 128, False, False, False),
    (384, 96, -1, False, False, True),
]
MS = (1, 2, 3, 7, 8, 16, 33, 128, 512)


# The slower fallback bodies get fewer batch sizes: their loops do not change with M past a
# block of rows, and M >= ops.CPU_DEQUANT_MIN_M goes to dequantize + matmul for them anyway.
ISA_MS = {"amx": MS, "avx512": MS, "avx2": (1, 2, 3, 7, 8, 16, 33), "scalar": (1, 3, 8, 33)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cpu_isa,m", [(i, m) for i in CPU_ISAS for m in ISA_MS[i]], indirect=["cpu_isa"])
@pytest.mark.parametrize("k,n,group_size,sym,act_order,with_bias", LAYERS)
def test_gemm_matches_oracle(k, n, group_size, sym, act_order, with_bias, m, dtype, cpu_isa):
    layer = make_layer(k, n, group_size, sym, act_order, dtype=dtype, seed=k + n)
    x = activations(m, k, dtype, seed=m)
    bias = (torch.randn(n) * 0.1).to(dtype) if with_bias else None
    assert_matches_oracle(run_gemm(x, layer, bias), x, layer, bias)


@pytest.mark.parametrize("m", [256, 512])
def test_fused_kernel_at_large_m(m, cpu_isa):
    """ops.gemm takes the dequantize + matmul path here; the fused op must still be right."""
    layer = make_layer(576, 40, 128, act_order=True, seed=3)
    q = prepared(layer)
    x = activations(m, 576, torch.float32)
    y = OPS.gemm_4bit(x, q.qweight, q.qzeros, q.scales, q.perm, q.group_size, None)
    assert_matches_oracle(y, x, layer)


@pytest.fixture(scope="module")
def layer_7b():
    """A 4096 x 11008 layer, 5 rows of activations and their oracle (computed once: ~1 s)."""
    layer = make_layer(4096, 11008, 128, seed=7)
    x = activations(5, 4096, torch.float32)
    return layer, x, oracle(x, layer)


@pytest.mark.parametrize("m", [1, 5])
def test_gemm_7b_shape(m, cpu_isa, layer_7b):
    layer, x, ref = layer_7b
    assert_matches_oracle(run_gemm(x[:m], layer), x[:m], layer, ref=ref[:m])


def test_activation_outliers_and_zero_groups(cpu_isa):
    """One huge activation per group (the AVX-512 grid's worst case) and an all-zero group."""
    layer = make_layer(512, 48, 128, seed=4)
    x = activations(3, 512, torch.float32) * 1e-3
    x[:, ::128] = 1e4
    x[1, 128:256] = 0.0
    assert_matches_oracle(run_gemm(x, layer), x, layer)


def test_non_finite_activations_stay_non_finite(cpu_isa):
    layer = make_layer(256, 24, 64, seed=2)
    x = activations(3, 256, torch.float32)
    x[0, 5], x[1, 70] = float("nan"), float("inf")
    y = run_gemm(x, layer)
    assert not torch.isfinite(y[:2]).any(), "a NaN/inf activation must reach every output of its row"
    assert_matches_oracle(y[2:], x[2:], layer)


def test_leading_dims_and_fp16_on_cpu():
    layer = make_layer(256, 24, 64, dtype=torch.float16)
    x = activations(6, 256, torch.float16).reshape(2, 3, 256)
    y = run_gemm(x, layer)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float16
    assert_matches_oracle(y.reshape(6, 24), x.reshape(6, 256), layer)


def test_scales_in_another_dtype_than_x():
    layer = make_layer(256, 24, 64, dtype=torch.float16)
    x = activations(3, 256, torch.bfloat16)
    y = run_gemm(x, layer)
    qw, qz, s, g, gs = layer
    assert_matches_oracle(y, x, (qw, qz, s.to(torch.bfloat16), g, gs))


def test_quantlinear_uses_the_kernel():
    lin = torch.nn.Linear(256, 48, bias=True)
    from bluelm_quant.config import QuantConfig

    q = QuantLinear.from_linear(lin, QuantConfig(bits=4, group_size=64), dtype=torch.float32)
    assert q.kernel_group_size == 64
    x = torch.randn(5, 256)
    with torch.no_grad():
        ref = x.double() @ q.dequantize(torch.float64).T + q.bias.double()
        assert torch.allclose(q(x).double(), ref, rtol=1e-4, atol=1e-4)


# --- outputs and determinism --------------------------------------------------------------------


def test_output_needs_no_zeroing():
    """The op allocates with torch.empty; poison freed memory of the same size first."""
    layer = make_layer(576, 40, 128, seed=5)
    qw, qz, s, g, gs = layer
    x = activations(7, 576, torch.float32)
    for _ in range(3):
        junk = torch.full((7, 40), float("nan"))
        del junk  # the allocator hands this block out again for the same size
        y = OPS.gemm_4bit(x, qw, qz, s, None, gs, None)
        assert_matches_oracle(y, x, layer)


def test_deterministic_across_calls_and_threads(cpu_isa):
    layer = make_layer(1024, 264, 128, act_order=True, seed=9)
    x = activations(5, 1024, torch.float32)
    q = prepared(layer)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = ops.gemm(x, q)
        torch.set_num_threads(2)
        y2 = ops.gemm(x, q)
        y3 = ops.gemm(x, q)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2) and torch.equal(y2, y3)


def test_concurrent_callers_get_the_serial_result():
    """Python threads calling at once: one gets the thread pool, the others run alone."""
    layer = make_layer(1024, 1032, 128, seed=11)
    xs = [activations(m, 1024, torch.float32, seed=m) for m in (1, 2, 3, 4)]
    want = [run_gemm(x, layer) for x in xs]
    got = [[] for _ in xs]

    def call(i):
        for _ in range(20):
            got[i].append(run_gemm(xs[i], layer))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(y, want[i]) for i in range(len(xs)) for y in got[i])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_runs_the_kernels():
    """The parent's pool threads do not exist in a forked child: it must start its own."""
    layer = make_layer(1024, 1032, 128, seed=12)
    x = activations(2, 1024, torch.float32)
    want = run_gemm(x, layer)  # the pool is up in this process now
    pid = os.fork()
    if pid == 0:  # child: exit code says whether the result matched; never return into pytest
        ok = False
        try:
            ok = torch.equal(run_gemm(x, layer), want)
        finally:
            os._exit(0 if ok else 1)
    for _ in range(600):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        threading.Event().wait(0.1)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung in the kernel")
    assert os.waitstatus_to_exitcode(status) == 0


def test_non_contiguous_inputs_are_copied():
    layer = make_layer(256, 24, 64)
    qw, qz, s, g, gs = layer
    x = activations(16, 256, torch.float32).T.contiguous().T[::2]  # strided view
    assert not x.is_contiguous()
    y = OPS.gemm_4bit(x, qw, qz, s.T.contiguous().T, None, gs, None)
    assert torch.equal(y, OPS.gemm_4bit(x.contiguous(), qw, qz, s, None, gs, None))


# --- prepare (act-order) -------------------------------------------------------------------------


def test_prepare_act_order_repacks_rows():
    qw, qz, s, g, gs = make_layer(256, 16, 64, act_order=True)
    q = ops.prepare(qw, qz, s, g, 4)
    perm = q.perm.long()
    assert q.group_size == 64
    assert torch.equal(g[perm], (torch.arange(256) // 64).to(torch.int32))  # groups now contiguous runs
    # Repacked rows are the original rows in perm order; the standard order comes back bit for bit.
    w = ops.dequantize_reference(qw, qz, s, g, 4)
    w_perm = ops.dequantize_reference(q.qweight, qz, s, g[perm], 4)
    assert torch.equal(w_perm, w[perm])
    assert torch.equal(ops.dequantize(q), w)
    assert torch.equal(ops.standard_qweight(q), qw)


@pytest.mark.parametrize("k,n", [(8, 1), (64, 24), (576, 40), (4096, 72)])
def test_repack_op_equals_torch_permutation(k, n):
    """The extension's act-order repack is the same permutation as packing.permute_rows."""
    from bluelm_quant.packing import permute_rows

    gen = torch.Generator().manual_seed(k + n)
    qw = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
    order = torch.randperm(k, generator=gen)
    got = ops.repack_rows(qw, order, 4)
    assert torch.equal(got, permute_rows(qw, order, 4))
    assert torch.equal(ops.repack_rows(got, torch.argsort(order), 4), qw)  # and back: bit-exact


def test_repack_op_refuses_out_of_range_rows():
    if ops.backend().startswith("reference"):
        pytest.skip("quant_cuda is not built")
    qw = torch.zeros(2, 8, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=r"order must hold row indices in \[0, 16\)"):
        torch.ops.bluelm_quant.permute_rows_4bit(qw, torch.arange(16) + 1)
    with pytest.raises(RuntimeError, match=r"order must be int64 \[16\]"):
        torch.ops.bluelm_quant.permute_rows_4bit(qw, torch.arange(8))


def test_prepare_without_act_order_changes_nothing_but_group_size():
    qw, qz, s, g, _ = make_layer(576, 16, 128)
    q = ops.prepare(qw, qz, s, g, 4)
    assert q.group_size == 128 and q.perm is None and q.qweight is qw


def test_prepare_refuses_uneven_groups_and_gemm_stays_correct():
    qw, qz, s, g, gs = make_layer(64, 16, 32)
    g = torch.cat([torch.zeros(24), torch.ones(40)]).to(torch.int32)  # groups of 24 and 40 rows
    q = ops.prepare(qw, qz, s, g, 4)
    assert q.group_size is None and q.perm is None
    x = activations(3, 64, torch.float32)
    assert_matches_oracle(ops.gemm(x, q), x, (qw, qz, s, g, 40))


def test_prepare_other_bit_widths_use_reference():
    from bluelm_quant.packing import pack_qweight as pq, pack_qzeros as pz

    qw = pq(torch.randint(0, 256, (64, 16), dtype=torch.int32), 8)
    qz = pz(torch.full((1, 16), 128, dtype=torch.int32), 8)
    assert ops.prepare(qw, qz, torch.rand(1, 16), torch.zeros(64, dtype=torch.int32), 8).group_size is None


# --- error paths ---------------------------------------------------------------------------------


def test_errors_name_the_problem():
    qw, qz, s, g, gs = make_layer(256, 24, 64)
    x = activations(2, 256, torch.float32)
    cases = [
        (lambda: OPS.gemm_4bit(x.double(), qw, qz, s, None, gs, None), "float32 or bfloat16"),
        (lambda: OPS.gemm_4bit(x[:, :248], qw, qz, s, None, gs, None), "K=248"),
        (lambda: OPS.gemm_4bit(x, qw, qz, s.to(torch.bfloat16), None, gs, None), "scales must have x's dtype"),
        (lambda: OPS.gemm_4bit(x, qw.long(), qz, s, None, gs, None), "qweight must be an int32 tensor [K/8, N]"),
        (lambda: OPS.gemm_4bit(x, qw, qz, s, None, 12, None), "group_size=12"),
        (lambda: OPS.gemm_4bit(x, qw, qz, s, None, 128, None), "scales [4, 24] must be [G, N] = [2, 24]"),
        (lambda: OPS.gemm_4bit(x, qw[:, :20], qz, s, None, gs, None), "multiple of 8"),
        (lambda: OPS.gemm_4bit(x, qw, qz, s, torch.arange(8, dtype=torch.int32), gs, None), "perm must be int32 [K]"),
        (lambda: OPS.gemm_4bit(x, qw, qz, s, torch.full((256,), 300, dtype=torch.int32), gs, None), "perm[0]=300"),
        (lambda: OPS.gemm_4bit(x, qw, qz, s, None, gs, torch.zeros(16)), "bias must be [N] = [24]"),
        (lambda: OPS.dequantize_4bit(qw, qz, s, gs, torch.float16), "float32 or bfloat16"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert message in str(info.value), f"expected {message!r} in: {info.value}"


def test_read_probe_reads_every_word():
    """The benchmarks' bandwidth probe (tools/bench_kernels.py): xor of all 64-bit words."""
    words = torch.randint(-(2**62), 2**62, (300_001,), dtype=torch.int64)
    want = 0
    for w in words.tolist():
        want ^= w & (2**64 - 1)
    assert OPS.read_probe(words) == want & (2**63 - 1)


def test_cpu_isa_choice():
    assert ops.cpu_isa() == DETECTED_ISA
    with pytest.raises(ops.QuantOpError, match="unknown CPU kernel body 'avx9'"):
        ops.set_cpu_isa("avx9")
    try:
        for isa in CPU_ISAS:
            assert ops.set_cpu_isa(isa) == isa and ops.cpu_isa() == isa
            assert isa in ops.backend()
    finally:
        ops.set_cpu_isa("best")
    assert ops.cpu_isa() == DETECTED_ISA


def test_cpu_isa_above_the_cpu_falls_back_with_a_warning(monkeypatch, caplog):
    """What a CPU without the asked-for body gets (the extension lowers the request)."""

    class OldCpu:  # stands in for quant_cuda on an AVX2-only CPU
        cpu_isa_detected = "avx2"

        @staticmethod
        def set_cpu_isa(name):
            return name if ops.CPU_ISAS.index(name) >= ops.CPU_ISAS.index("avx2") else "avx2"

    monkeypatch.setattr(extension, "_ext", OldCpu)
    monkeypatch.setattr(cpu_settings, "_cpu_isa", "avx2")
    with caplog.at_level("WARNING", logger="bluelm_quant.ops"):
        assert ops.set_cpu_isa("amx") == "avx2"
    assert "this CPU cannot run the amx kernels (it has avx2): using avx2" in caplog.text
    assert ops.cpu_isa() == "avx2"


def test_cpu_isa_environment_variable_at_import():
    code = "from bluelm_quant import ops; print(ops.cpu_isa())"
    env = dict(os.environ, BLUELM_QUANT_CPU_ISA="scalar")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "scalar"


def test_cpu_isa_environment_variable_typo(monkeypatch, caplog):
    monkeypatch.setenv("BLUELM_QUANT_CPU_ISA", "avx9")
    with caplog.at_level("WARNING", logger="bluelm_quant.ops"):
        cpu_settings._isa_from_environment()
    assert "BLUELM_QUANT_CPU_ISA='avx9' ignored: unknown CPU kernel body 'avx9'" in caplog.text
    assert ops.cpu_isa() == DETECTED_ISA


def test_more_threads_than_cpus_warns_and_stays_right(monkeypatch, caplog):
    layer = make_layer(1024, 264, 128, seed=13)
    x = activations(2, 1024, torch.float32)
    want = run_gemm(x, layer)
    monkeypatch.setattr(extension, "_warned", set())
    before = torch.get_num_threads()
    cpus = cpu_settings._USABLE_CPUS
    try:
        torch.set_num_threads(cpus + 3)
        with caplog.at_level("WARNING", logger="bluelm_quant.ops"):
            y = run_gemm(x, layer)
    finally:
        torch.set_num_threads(before)
    assert f"torch.get_num_threads() is {cpus + 3} but this process may run on {cpus} CPUs" in caplog.text
    assert torch.equal(y, want)


def test_gateway_errors():
    qw, qz, s, g, gs = make_layer(256, 24, 64)
    with pytest.raises(ops.QuantOpError, match="in_features=256"):
        ops.gemm(torch.randn(2, 248), prepared((qw, qz, s, g, gs)))
    with pytest.raises(ops.QuantOpError, match="are on meta but"):
        ops.gemm(torch.randn(2, 256, device="meta"), ops.QLayer(qw, qz, s, g, 4))


def test_empty_batch():
    qw, qz, s, g, gs = make_layer(256, 24, 64)
    assert OPS.gemm_4bit(torch.empty(0, 256), qw, qz, s, None, gs, None).shape == (0, 24)


# --- int8 GEMM (the quantized lm_head) --------------------------------------------------------------
# Tolerance: the fp32 bodies sum K products x*w in fp32, off by at most (K + 8) * 2^-24 *
# (|x| @ |w|); the AVX-512 body sums exactly in integers after moving each x by at most
# 1.004 * 2^-24 * max|x| of its row (the 24-bit grid, quant_cuda/cpu_kernels.h), plus a
# few fp32 roundings inside the first term. Then the scale, and the output dtype's rounding.


def int8_layer(n, k, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, generator=gen) * 0.01 + 0.001).to(dtype)
    return weight, scale


def assert_int8_matches_oracle(y, x, weight, scale, bias=None):
    x64, w64, s64 = x.double(), weight.double(), scale.double()
    ref = (x64 @ w64.T) * s64 + (0.0 if bias is None else bias.double())
    mag = (x64.abs() @ w64.abs().T) * s64
    grid = 1.004 * 2.0**-24 * x64.abs().amax(dim=1, keepdim=True) * (w64.abs().sum(dim=1) * s64)
    k = weight.shape[1]
    tol = (k + 8) * 2.0**-24 * mag + grid + OUT_EPS[y.dtype] * ref.abs() + 1e-30
    assert y.shape == ref.shape and y.dtype == x.dtype
    worst = ((y.double() - ref).abs() / tol).max().item()
    assert worst <= 1.0, f"max error is {worst:.2f}x the tolerance (shape {tuple(y.shape)})"


# K: multiples of 64, a tail of 1 and 63 past them, not a multiple of 8; N: 16-row blocks
# and partial ones.
INT8_SHAPES = [(1, 576, 1000), (3, 64, 17), (2, 100, 33), (7, 577, 50), (4, 8, 16), (1, 1, 5), (16, 191, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,n", INT8_SHAPES)
def test_gemm_int8_matches_oracle(m, k, n, dtype, cpu_isa):
    weight, scale = int8_layer(n, k, dtype, seed=k + n)
    x = activations(m, k, dtype, seed=m)
    bias = (torch.randn(n) * 0.1).to(dtype) if m % 2 else None
    assert_int8_matches_oracle(OPS.gemm_int8(x, weight, scale, bias), x, weight, scale, bias)


def test_gemm_int8_smollm2_head_shape(cpu_isa):
    weight, scale = int8_layer(49152, 576, seed=5)
    x = activations(2, 576, torch.float32) * 4
    x[:, 7] = 300.0  # an outlier channel, as after a final RMSNorm
    assert_int8_matches_oracle(OPS.gemm_int8(x, weight, scale, None), x, weight, scale)


def test_gemm_int8_non_finite_rows(cpu_isa):
    weight, scale = int8_layer(40, 64)
    x = activations(3, 64, torch.float32)
    x[1, 3] = float("inf")
    y = OPS.gemm_int8(x, weight, scale, None)
    assert not torch.isfinite(y[1]).any()
    assert_int8_matches_oracle(y[[0, 2]], x[[0, 2]], weight, scale)


def test_gemm_int8_deterministic_across_threads():
    weight, scale = int8_layer(4099, 576, seed=3)
    x = activations(3, 576, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = OPS.gemm_int8(x, weight, scale, None)
        torch.set_num_threads(2)
        y2 = OPS.gemm_int8(x, weight, scale, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_gemm_int8_gateway():
    weight, scale = int8_layer(24, 64, torch.float16)
    x = activations(6, 64, torch.float16).reshape(2, 3, 64)
    assert ops.int8_kernel_runs(x)
    y = ops.gemm_int8(x, weight, scale)
    assert y.shape == (2, 3, 24) and y.dtype == torch.float16
    assert_int8_matches_oracle(y.reshape(6, 24), x.reshape(6, 64), weight, scale)
    big = torch.zeros(int8_ops.CPU_INT8_DEQUANT_MIN_M, 64)
    assert not ops.int8_kernel_runs(big) and not ops.int8_kernel_runs(x.double())
    with pytest.raises(ops.QuantOpError, match="no int8 kernel"):
        ops.gemm_int8(big, weight, scale)
    with pytest.raises(ops.QuantOpError, match="weight must be a 2-D int8"):
        ops.gemm_int8(x, weight.float(), scale)


def test_gemm_int8_errors_name_the_problem():
    weight, scale = int8_layer(24, 64)
    x = activations(2, 64, torch.float32)
    cases = [
        (lambda: OPS.gemm_int8(x.double(), weight, scale, None), "float32 or bfloat16"),
        (lambda: OPS.gemm_int8(x[:, :60], weight, scale, None), "K=60"),
        (lambda: OPS.gemm_int8(x, weight.short(), scale, None), "weight must be a 2-D int8"),
        (lambda: OPS.gemm_int8(x, weight, scale[:5], None), "scale must be Float [N] = [24]"),
        (lambda: OPS.gemm_int8(x, weight, scale.to(torch.bfloat16), None), "scale must be Float"),
        (lambda: OPS.gemm_int8(x, weight, scale, torch.zeros(3)), "bias must be Float [N] = [24]"),
        (lambda: OPS.gemm_int8(x[0], weight, scale, None), "x must be 2-D"),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError) as info:
            call()
        assert message in str(info.value), f"expected {message!r} in: {info.value}"


# --- torch.compile / fake tensors -------------------------------------------------------------------


def test_opcheck():
    qw, qz, s, g, gs = make_layer(576, 24, 128, act_order=True)
    q = ops.prepare(qw, qz, s, g, 4)
    x = activations(3, 576, torch.float32)
    bias = torch.randn(24)
    torch.library.opcheck(OPS.gemm_4bit.default, (x, q.qweight, qz, s, q.perm, gs, bias))
    torch.library.opcheck(OPS.dequantize_4bit.default, (qw, qz, s, gs, torch.bfloat16))
    weight, scale = int8_layer(40, 100)
    torch.library.opcheck(OPS.gemm_int8.default, (activations(3, 100, torch.float32), weight, scale, bias[:1].expand(40).clone()))


def test_compiles_without_graph_breaks():
    q = prepared(make_layer(256, 24, 64, act_order=True))
    ops.gemm(activations(1, 256, torch.float32), q)  # the first call checks the kernel, eagerly

    def f(x):
        return ops.gemm(x, q)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True, dynamic=True)
    for m in (2, 5):
        x = activations(m, 256, torch.float32, seed=m)
        assert torch.equal(compiled(x), f(x))


# --- CUDA (run unchanged on a GPU machine) ------------------------------------------------------------

cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of quant_cuda")


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k,n,group_size,sym,act_order,with_bias", LAYERS)
def test_cuda_gemm_matches_oracle(k, n, group_size, sym, act_order, with_bias, m, dtype):
    layer = make_layer(k, n, group_size, sym, act_order, dtype=dtype, seed=k + n, device="cuda")
    x = activations(m, k, dtype, seed=m, device="cuda")
    bias = (torch.randn(n) * 0.1).to(dtype).cuda() if with_bias else None
    assert_matches_oracle(run_gemm(x, layer, bias), x, layer, bias, weight_eps=OUT_EPS[dtype])


@cuda
@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 512])
def test_cuda_fused_kernel_and_7b_shape(m):
    layer = make_layer(4096, 11008, 128, dtype=torch.float16, seed=7, device="cuda")
    qw, qz, s, g, gs = layer
    x = activations(m, 4096, torch.float16, device="cuda")
    y = OPS.gemm_4bit(x, qw, qz, s, None, gs, None)
    assert_matches_oracle(y, x, layer, weight_eps=OUT_EPS[torch.float16])
    assert torch.equal(y, OPS.gemm_4bit(x, qw, qz, s, None, gs, None)), "two calls differ"


@cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_dequantize_matches_reference(dtype):
    qw, qz, s, g, gs = make_layer(576, 40, 128, dtype=dtype, device="cuda")
    w = OPS.dequantize_4bit(qw, qz, s, gs, None)
    ref = ops.dequantize_reference(qw, qz, s, g, 4, torch.float64)
    assert torch.allclose(w.double(), ref, rtol=OUT_EPS[dtype], atol=0)


@cuda
@needs_cuda
def test_cuda_float32_activations_and_device_errors():
    layer = make_layer(256, 24, 64, dtype=torch.float32, device="cuda")
    x = activations(3, 256, torch.float32, device="cuda")
    y = run_gemm(x, layer)
    assert y.dtype == torch.float32
    qw, qz, s, g, gs = layer
    assert_matches_oracle(y, x, layer, weight_eps=2.0**-8)  # computed in fp16: x, scales, w and y rounded
    with pytest.raises(RuntimeError, match="but the quantized weights are on"):
        OPS.gemm_4bit(x.cpu(), qw, qz, s.half(), None, gs, None)
    with pytest.raises(RuntimeError, match="float16 or bfloat16"):
        OPS.gemm_4bit(x, qw, qz, s, None, gs, None)
