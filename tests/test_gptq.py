"""GPTQ solver: beats RTN on correlated inputs, returns a self-consistent grid, act-order
and static groups bookkeeping, the Hessian running mean and the error paths."""
import logging

import pytest
import torch

from bluelm_quant.config import QuantConfig
from bluelm_quant.gptq import GPTQ, GPTQError
from bluelm_quant.quantizer import find_params, rtn

N, K, SAMPLES = 96, 256, 1024


def correlated_inputs(k=K, samples=SAMPLES, seed=0):
    """X = Z A (mixed, so H has strong off-diagonal terms) with a few outlier columns."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(samples, k, generator=gen)
    a = torch.randn(k, k, generator=gen) / k**0.5
    x = z @ a
    x[:, torch.randperm(k, generator=gen)[:4]] *= 20
    return x


def weight(n=N, k=K, seed=1):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) * 0.02


def solver(x):
    g = GPTQ(x.shape[-1])
    g.add_batch(x)
    return g


def output_error(x, w, q):
    return torch.linalg.matrix_norm(x.double() @ (w - q).double().T).item()


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(one_thread):
    x = correlated_inputs()
    return x, weight(), solver(x)


ORDERS = [(False, False), (True, False), (False, True), (True, True)]  # (desc_act, static)


@pytest.mark.parametrize("group_size", [128, 32, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act,static", ORDERS)
def test_beats_rtn_and_is_consistent(data, group_size, sym, desc_act, static):
    x, w, g = data
    cfg = QuantConfig(group_size=group_size, sym=sym, desc_act=desc_act, static_groups=static)
    res = g.quantize(w, cfg)
    qw = res.quantized
    # The returned grid reproduces exactly the Q the solver optimised.
    assert qw.codes.dtype == torch.int32 and qw.zeros.dtype == torch.int32
    assert qw.codes.min() >= 0 and qw.codes.max() <= cfg.maxq
    assert qw.scales.shape == (cfg.groups(K), N)
    assert torch.equal(qw.scales.half().float(), qw.scales)  # exactly what fp16 storage keeps
    assert res.damp == cfg.damp_percent and res.seconds > 0
    err = output_error(x, w, res.dequantized)
    err_rtn = output_error(x, w, rtn(w, cfg).dequantize())
    assert err < 0.75 * err_rtn, (err, err_rtn)


@pytest.mark.parametrize("desc_act", [False, True])
def test_loss_is_the_damped_quadratic_error(data, desc_act):
    x, w, g = data
    res = g.quantize(w, QuantConfig(group_size=32, desc_act=desc_act))
    h = g.H.double().clone()
    h.diagonal().add_(res.damp * h.diagonal().mean())
    d = (w - res.dequantized).double()
    assert res.loss == pytest.approx(torch.trace(d @ h @ d.T).item() / 2, rel=1e-3)
    # with H = 2/n X^T X that is the mean squared output error per sample + the damping term
    damp_term = res.damp * g.H.diagonal().mean().item() * d.square().sum().item() / 2
    mse = output_error(x, w, res.dequantized) ** 2 / SAMPLES
    assert res.loss == pytest.approx(mse + damp_term, rel=1e-3)


def test_deterministic(data):
    _, w, g = data
    cfg = QuantConfig(group_size=32, sym=False, desc_act=True)
    a, b = g.quantize(w, cfg), g.quantize(w, cfg)
    assert torch.equal(a.quantized.codes, b.quantized.codes) and a.loss == b.loss


@pytest.mark.parametrize("group_size", [32, -1])
def test_act_order_matches_permuted_problem(data, group_size):
    x, w, g = data
    res = g.quantize(w, QuantConfig(group_size=group_size, desc_act=True))
    perm = torch.argsort(torch.diag(g.H), descending=True, stable=True)
    ref_solver = GPTQ(K)
    ref_solver.H, ref_solver.nsamples = g.H[perm][:, perm].clone(), g.nsamples
    ref = ref_solver.quantize(w[:, perm], QuantConfig(group_size=group_size))
    assert torch.equal(res.quantized.codes[:, perm], ref.quantized.codes)
    assert torch.equal(res.quantized.scales, ref.quantized.scales)
    assert torch.equal(res.quantized.zeros, ref.quantized.zeros)
    assert torch.equal(res.quantized.g_idx[perm], ref.quantized.g_idx)
    assert res.loss == ref.loss


def test_act_order_groups_and_partial_last_group():
    k = 576  # 4 full groups of 128 and one of 64
    x = correlated_inputs(k=k, samples=768)
    w = weight(k=k)
    g = solver(x)
    for desc_act in (False, True):
        res = g.quantize(w, QuantConfig(group_size=128, desc_act=desc_act))
        g_idx = res.quantized.g_idx
        assert res.quantized.scales.shape == (5, N)
        assert torch.bincount(g_idx).tolist() == [128, 128, 128, 128, 64]
        monotone = bool((g_idx[1:] >= g_idx[:-1]).all())
        assert monotone != desc_act
    # act-order groups follow the quantization order: the first group holds the largest diag(H)
    perm = torch.argsort(torch.diag(g.H), descending=True, stable=True)
    assert torch.equal(g_idx[perm].long(), torch.arange(k) // 128)


@pytest.mark.parametrize("desc_act", [False, True])
def test_static_groups_use_the_original_grid(data, desc_act):
    _, w, g = data
    cfg = QuantConfig(group_size=32, sym=False, desc_act=desc_act, static_groups=True)
    qw = g.quantize(w, cfg).quantized
    assert torch.equal(qw.g_idx.long(), torch.arange(K) // 32)
    for grp in range(K // 32):
        scale, zero = find_params(w[:, grp * 32 : (grp + 1) * 32], 4, False)
        assert torch.equal(qw.scales[grp], scale) and torch.equal(qw.zeros[grp], zero.int())


def test_groups_crossing_blocks_see_pending_updates(data):
    """Block 48 with groups of 32: a group starting at column 32 spans into the next block,
    whose columns still owe the lazy update; the grid must include it, so the result
    matches the run with aligned blocks up to float rounding."""
    _, w, g = data
    cfg = QuantConfig(group_size=32, sym=False)
    a, b = g.quantize(w, cfg, blocksize=128), g.quantize(w, cfg, blocksize=48)
    torch.testing.assert_close(b.quantized.scales, a.quantized.scales, rtol=2e-3, atol=0)
    assert (a.quantized.codes != b.quantized.codes).float().mean() < 1e-3
    assert b.loss == pytest.approx(a.loss, rel=1e-3)


def test_hessian_running_mean_over_uneven_batches():
    x = correlated_inputs(k=64, samples=300)
    whole = solver(x)
    parts = GPTQ(64)
    parts.add_batch(x[:1])
    parts.add_batch(x[1:41].reshape(2, 4, 5, 64))  # any leading shape is rows
    parts.add_batch(x[41:41].reshape(0, 64))  # empty batches are ignored
    parts.add_batch(x[41:].reshape(7, 37, 64))
    assert whole.nsamples == parts.nsamples == 300
    torch.testing.assert_close(parts.H, whole.H, rtol=1e-5, atol=1e-5)
    exact = 2 / 300 * x.double().T @ x.double()
    torch.testing.assert_close(whole.H.double(), exact, rtol=1e-5, atol=1e-3)
    half = GPTQ(64)
    half.add_batch(x.bfloat16())
    xb = x.bfloat16().double()
    torch.testing.assert_close(half.H.double(), 2 / 300 * xb.T @ xb, rtol=1e-5, atol=1e-3)


def test_dead_input_column():
    x = correlated_inputs(k=64, samples=256)
    x[:, 5] = 0
    w = weight(k=64)
    res = solver(x).quantize(w, QuantConfig(group_size=32, sym=False, desc_act=True))
    assert torch.isfinite(res.dequantized).all() and torch.isfinite(torch.tensor(res.loss))
    assert (res.dequantized[:, 5] == 0).all()


def test_all_inputs_dead():
    res = solver(torch.zeros(16, 64)).quantize(weight(k=64), QuantConfig(group_size=32))
    assert (res.dequantized == 0).all() and res.loss == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_activations_raise(bad):
    x = torch.randn(4, 3, 64)
    x[1, 2, 7] = bad
    with pytest.raises(GPTQError, match="activations contain NaN/Inf"):
        GPTQ(64).add_batch(x)


def test_shape_and_state_errors():
    g = GPTQ(64)
    with pytest.raises(GPTQError, match="no calibration"):
        g.quantize(weight(k=64), QuantConfig())
    with pytest.raises(GPTQError, match="63 features"):
        g.add_batch(torch.randn(2, 63))
    g.add_batch(torch.randn(8, 64))
    with pytest.raises(GPTQError, match="Hessian is for 64 inputs"):
        g.quantize(weight(k=32), QuantConfig())
    g.free()
    assert g.H is None
    with pytest.raises(GPTQError, match="after free"):
        g.add_batch(torch.randn(2, 64))


def indefinite_hessian(k, min_eig):
    """Symmetric H with mean diagonal 1 and smallest eigenvalue min_eig (< 0)."""
    gen = torch.Generator().manual_seed(3)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=gen))
    eig = torch.linspace(min_eig, 2 - min_eig, k)  # mean 1 = mean(diag(H))
    return (basis * eig) @ basis.T


def test_damp_retry_is_logged(caplog):
    g = GPTQ(64)
    g.H, g.nsamples = indefinite_hessian(64, -0.03), 1
    with caplog.at_level(logging.WARNING, logger="bluelm_quant.gptq"):
        res = g.quantize(weight(k=64), QuantConfig(group_size=32, damp_percent=0.01))
    assert res.damp == pytest.approx(0.04)  # 0.01 and 0.02 leave it indefinite
    retries = [r.getMessage() for r in caplog.records if "Cholesky" in r.getMessage()]
    assert len(retries) == 2 and "retrying with 0.02" in retries[0]
    assert torch.isfinite(res.dequantized).all()


def test_a_failed_factorization_of_the_inverse_retries_with_more_damping(data, monkeypatch):
    """The inverse is factorized in place (memory); a failure there must still retry from H."""
    _, w, s = data
    cfg = QuantConfig(group_size=32, damp_percent=0.01)
    h = s.H.clone()
    expected = GPTQ(s.in_features)
    expected.H, expected.nsamples = h.clone(), s.nsamples
    want = expected.quantize(w, QuantConfig(group_size=32, damp_percent=0.02))

    real, failed = torch.linalg.cholesky_ex, []

    def fail_once(a, upper=False, **kw):
        lower_or_upper, info = real(a, upper=upper, **kw)
        if upper and not failed:
            failed.append(1)
            return lower_or_upper, torch.ones_like(info)
        return lower_or_upper, info

    monkeypatch.setattr(torch.linalg, "cholesky_ex", fail_once)
    got = s.quantize(w, cfg)
    assert failed and got.damp == pytest.approx(0.02)
    assert torch.equal(got.quantized.codes, want.quantized.codes)


def test_hopeless_hessian_raises():
    g = GPTQ(64)
    g.H, g.nsamples = indefinite_hessian(64, -1.5), 1
    with pytest.raises(GPTQError, match="not positive definite"):
        g.quantize(weight(k=64), QuantConfig())


@pytest.mark.parametrize("desc_act", [False, True])
def test_stacked_linears_sharing_a_hessian_match_separate_runs(data, desc_act):
    """The pipeline quantizes q/k/v (and gate/up) as one stacked weight; rows are independent."""
    _, w, s = data
    cfg = QuantConfig(group_size=32, sym=False, desc_act=desc_act)
    a, b = w[:40], w[40:]
    stacked = s.quantize(torch.cat([a, b]), cfg)
    for part, (start, stop) in ((a, (0, 40)), (b, (40, w.shape[0]))):
        alone = s.quantize(part, cfg)
        got = stacked.quantized.rows(start, stop)
        assert torch.equal(got.codes, alone.quantized.codes)
        assert torch.equal(got.scales, alone.quantized.scales)
        assert torch.equal(got.g_idx, alone.quantized.g_idx)
        assert float(stacked.row_loss[start:stop].sum()) == pytest.approx(alone.loss, rel=1e-4)


def test_handing_over_the_hessian_gives_the_same_result(data):
    x, w, _ = data
    keep, hand = solver(x), solver(x)
    a = keep.quantize(w, QuantConfig(group_size=32, desc_act=True))
    b = hand.quantize(w, QuantConfig(group_size=32, desc_act=True), keep_hessian=False)
    assert torch.equal(a.quantized.codes, b.quantized.codes) and a.loss == b.loss
    assert keep.H is not None and hand.H is None
    with pytest.raises(GPTQError, match="no calibration"):
        hand.quantize(w, QuantConfig())
