"""The kernels' first-use self-check (bluelm_quant/kernel_check.py), with a kernel made wrong on
purpose through the test-only hook `kernel_check.STATE.fault`."""
import logging

import pytest
import torch

from bluelm_quant import extension, kernel_check, ops
from bluelm_quant.config import QuantConfig
from bluelm_quant.nn import QuantLinear

pytestmark = pytest.mark.skipif(extension.quant_cuda() is None, reason="needs the compiled quant_cuda extension")


@pytest.fixture
def state():
    """A fresh self-check state for the test, restored afterwards."""
    saved = (kernel_check.STATE.enabled, dict(kernel_check.STATE.verdicts), kernel_check.STATE.fault)
    kernel_check.STATE.enabled, kernel_check.STATE.fault = True, None
    kernel_check.STATE.reset()
    yield kernel_check.STATE
    kernel_check.STATE.enabled, kernel_check.STATE.fault = saved[0], saved[2]
    kernel_check.STATE.verdicts.clear()
    kernel_check.STATE.verdicts.update(saved[1])


def layer(k=256, n=96, act_order=False, seed=0):
    torch.manual_seed(seed)
    q = QuantLinear.from_linear(torch.nn.Linear(k, n, bias=True), QuantConfig(group_size=64), dtype=torch.float32)
    if act_order:
        q.g_idx = q.g_idx[torch.randperm(k)]
        q.post_init()
    return q


def paths() -> int:
    """M-paths a CPU configuration has: the row classes, plus dequantize + matmul unless the body never hands over."""
    return len(kernel_check.M_CLASSES) + (ops._dequant_min_m(torch.device("cpu")) <= kernel_check.MAX_CHECK_M)


def reference(q, x):
    return x.double() @ q.dequantize(torch.float64).T + q.bias.double()


def test_a_correct_kernel_passes_every_path_once(state):
    q = layer()
    x = torch.randn(3, 256)
    with torch.no_grad():
        q(x)
        q(torch.randn(1, 256))
    verdicts = kernel_check.report()
    assert len(verdicts) == paths()  # every M-path at once
    assert all(v["ok"] for v in verdicts), verdicts


def test_a_wrong_kernel_is_caught_and_the_reference_path_takes_over(state, caplog):
    q = layer(act_order=True)
    x = torch.randn(5, 256)
    expected = reference(q, x)
    state.fault = lambda y: y + 1.0  # every kernel output off by one
    with caplog.at_level(logging.WARNING, logger="bluelm_quant.kernel_check"), torch.no_grad():
        y1 = q(x)
        y2 = q(x)
    assert torch.allclose(y1.double(), expected, atol=1e-4) and torch.equal(y1, y2)
    warnings = [r for r in caplog.records if "disagrees with the reference path" in r.getMessage()]
    assert len(warnings) == paths()  # one per path, once
    text = warnings[0].getMessage()
    assert "act-order" in text and "group size 64" in text and "tools/gpu_check.py" in text
    assert not any(v["ok"] for v in kernel_check.report())


def test_column_blocks_are_a_configuration_of_their_own_and_checked(state, caplog):
    """A layer in column blocks (column_blocks.py) gets its own verdicts, judged on a part in blocks of
    its own: a kernel wrong there is caught and the reference path answers."""
    plain, blocked = layer(seed=1), layer(seed=1)
    blocked.use_column_blocks(32)
    x = torch.randn(2, 256)
    with torch.no_grad():
        plain(x)
        state.fault = lambda y: y + 1.0
        with caplog.at_level(logging.WARNING, logger="bluelm_quant.kernel_check"):
            y = blocked(x)
    assert torch.allclose(y.double(), reference(blocked, x), atol=1e-4)
    configs = {v["config"]: v["ok"] for v in kernel_check.report()}
    assert any("column blocks" in c and not ok for c, ok in configs.items())
    assert all(ok for c, ok in configs.items() if "column blocks" not in c)


def test_every_cpu_body_and_the_dequantize_path_are_checked(state):
    """Each CPU body is its own configuration; a body that hands large M over to dequantize +
    matmul gets that path checked too."""
    q = layer()
    bodies = [b for b in ("avx2", "scalar") if ops.set_cpu_isa(b) == b]
    try:
        for body in bodies:
            ops.set_cpu_isa(body)
            with torch.no_grad():
                q(torch.randn(1, 256))
    finally:
        ops.set_cpu_isa("best")
    checked = {v["config"] for v in kernel_check.report()}
    for body in bodies:
        assert {f"cpu ({body} body)" in c for c in checked} == {True, False} or len(bodies) == 1
        assert any(f"({body} body)" in c and c.endswith("dequantize + matmul") for c in checked)


def test_only_the_wrong_path_falls_back(state):
    """A fault in the 9-16 row variant leaves the others on the kernel."""
    q = layer()
    state.fault = lambda y: y * 1.5 if 8 < y.shape[0] <= 16 else y
    with torch.no_grad():
        y16 = q(x16 := torch.randn(12, 256))
        q(torch.randn(1, 256))
    bad = {v["config"].rpartition(", ")[2] for v in kernel_check.report() if not v["ok"]}
    assert bad == {"16-row kernel"}
    assert torch.allclose(y16.double(), reference(q, x16), atol=1e-4)


def test_turned_off_the_planted_fault_shows(state):
    """Proof that the hook breaks the kernel: without the check, the wrong output comes through."""
    q = layer()
    kernel_check.set_enabled(False)
    state.fault = lambda y: y + 1.0
    x = torch.randn(2, 256)
    with torch.no_grad():
        y = q(x)
    assert torch.allclose(y.double(), reference(q, x) + 1.0, atol=1e-4)
    assert kernel_check.report() == []


def test_the_environment_variable_turns_it_off(monkeypatch):
    monkeypatch.setenv(kernel_check.ENV, "0")
    assert not kernel_check.SelfCheck().enabled
    monkeypatch.setenv(kernel_check.ENV, "1")
    assert kernel_check.SelfCheck().enabled


def test_nan_output_is_a_mismatch(state):
    q = layer()
    state.fault = lambda y: torch.full_like(y, float("nan"))
    x = torch.randn(1, 256)
    with torch.no_grad():
        y = q(x)
    assert torch.isfinite(y).all() and torch.allclose(y.double(), reference(q, x), atol=1e-4)
