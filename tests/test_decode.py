"""The fast decode path (issue 14, item 4): QuantLinear's planned kernel call, the decode thread
split, the static-cache and compiled loops giving the eager path's greedy tokens, the 4-bit lm_head."""
import logging
import os

import pytest
import torch

from bluelm_quant import cpu_settings, extension, kernel_check, ops
from bluelm_quant.config import QuantConfig
from bluelm_quant.generate import Generator, decode_threads, fast_generate_config
from bluelm_quant.loading import load_quantized
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.placement import quantize_head_4bit
from bluelm_quant.saving import save_quantized

from tiny_models import save_tiny_4bit, tiny_llama, tokens

pytestmark = [pytest.mark.skipif(extension.quant_cuda() is None, reason="needs the compiled quant_cuda extension"),
              pytest.mark.usefixtures("one_thread")]


def quant_layer(k=256, n=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return QuantLinear.from_linear(torch.nn.Linear(k, n, bias=bias), QuantConfig(group_size=64), dtype=torch.float32)


@pytest.fixture
def saved_tiny(tmp_path_factory):
    return save_tiny_4bit(str(tmp_path_factory.mktemp("decode") / "q"), seed=4)


# --- QuantLinear's planned kernel call ------------------------------------------------------------


def test_planned_call_equals_the_checked_path():
    q = quant_layer()
    with torch.no_grad():
        x1 = torch.randn(1, 1, 256)
        first = q(x1)  # checked path; the plan is made after it
        assert isinstance(q._plan, ops.GemmPlan)
        for shape in ((1, 1, 256), (3, 256), (2, 5, 256)):
            x = torch.randn(*shape)
            assert ops.plan_applies(q._plan, x)
            assert torch.equal(q(x), ops.gemm(x, q.quant_layer()))
        assert torch.equal(q(x1), first)


def test_plan_is_not_used_where_gemm_decides_otherwise():
    q = quant_layer()
    with torch.no_grad():
        q(torch.randn(1, 256))
    plan = q._plan
    assert not ops.plan_applies(plan, torch.randn(1, 256, dtype=torch.bfloat16))  # another compute dtype
    assert not ops.plan_applies(plan, torch.randn(1, 128))  # wrong width: gemm's error message
    assert not ops.plan_applies(plan, torch.randn(1, 256, requires_grad=True))  # the reference path has a backward
    assert not ops.plan_applies(plan, torch.randn(plan.max_rows, 256)) if plan.max_rows < 4096 else True
    with pytest.raises(ops.QuantOpError, match="in_features=256"):
        q(torch.randn(1, 128))


def test_plan_is_dropped_when_the_tensors_change():
    q = quant_layer()
    with torch.no_grad():
        q(torch.randn(1, 256))
        assert q._plan
        q.to(torch.float32)
        assert q._plan is None  # .to() makes new tensors (or keeps them: planned again on the next call)
        q(torch.randn(1, 256))
        q.scales = q.scales * 2
        assert q._plan is None
        x = torch.randn(1, 256)
        assert torch.equal(q(x), ops.gemm(x, q.quant_layer()))  # the doubled scales are used
        assert q._plan.scales is q.scales


def test_plan_gives_way_to_a_planted_fault_and_a_reset_check():
    """A plan never skips what the self-check would do: a wrong kernel is still caught."""
    q = quant_layer()
    x = torch.randn(3, 256)
    saved = (kernel_check.STATE.enabled, dict(kernel_check.STATE.verdicts), kernel_check.STATE.fault)
    try:
        with torch.no_grad():
            want = q(x)
            assert q._plan
            kernel_check.STATE.reset()
            kernel_check.STATE.fault = lambda y: y + 1.0
            got = q(x)  # re-checked: the faulty kernel is refused, the reference path answers
        assert torch.allclose(got, want, atol=1e-4)
        assert any(not v["ok"] for v in kernel_check.report())
    finally:
        kernel_check.STATE.enabled, kernel_check.STATE.fault = saved[0], saved[2]
        kernel_check.STATE.reset()
        kernel_check.STATE.verdicts.update(saved[1])


def test_plan_follows_the_cpu_body():
    q = quant_layer()
    with torch.no_grad():
        q(torch.randn(1, 256))
    try:
        ops.set_cpu_isa("scalar")
        assert not ops.plan_applies(q._plan, torch.randn(1, 256))  # verdicts are per body
    finally:
        ops.set_cpu_isa("best")
    assert ops.plan_applies(q._plan, torch.randn(1, 256))


# --- threads ---------------------------------------------------------------------------------------


def test_decode_threads_splits_and_restores():
    before = torch.get_num_threads()
    with decode_threads(2):
        assert torch.get_num_threads() == 1
        assert ops.kernel_threads() == 2
    assert torch.get_num_threads() == before and ops.kernel_threads_setting() == 0


def test_kernel_threads_bad_counts(monkeypatch, caplog):
    with pytest.raises(ops.QuantOpError, match=r"set_kernel_threads\(-1\): use a positive thread count"):
        ops.set_kernel_threads(-1)
    monkeypatch.setattr(extension, "_warned", set())
    try:
        with caplog.at_level(logging.WARNING, logger="bluelm_quant.ops"):
            used = ops.set_kernel_threads(cpu_settings._USABLE_CPUS + 5)
        assert used == cpu_settings._USABLE_CPUS
        assert f"set_kernel_threads({cpu_settings._USABLE_CPUS + 5}) but this process may run on {cpu_settings._USABLE_CPUS} CPUs" in caplog.text
        q = quant_layer()
        x = torch.randn(2, 256)
        with torch.no_grad():
            assert torch.allclose(q(x), x @ q.dequantize().T + q.bias, atol=1e-4)  # runs, capped
    finally:
        ops.set_kernel_threads(None)


# --- the loops give the eager path's greedy tokens ----------------------------------------------------


def greedy(model, ids, n, **kwargs):
    with torch.inference_mode():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs)


def test_static_cache_generate_matches_the_dynamic_cache(saved_tiny):
    model = load_quantized(saved_tiny, dtype=torch.float32)
    ids = tokens(batch=1, seq=8)
    ref = greedy(model, ids, 12)
    with decode_threads():
        assert torch.equal(greedy(model, ids, 12, **fast_generate_config(model)), ref)
        assert torch.equal(greedy(model, ids[:, :5], 12, **fast_generate_config(model, max_cache_len=64)),
                           greedy(model, ids[:, :5], 12))


def test_compiled_decode_matches_eager(saved_tiny):
    """Inductor on the CPU with our custom ops: the loop and model.generate, compiled."""
    model = load_quantized(saved_tiny, dtype=torch.float32)
    ids = tokens(batch=1, seq=8)
    ref = greedy(model, ids, 10)
    gen = Generator(model, max_len=24, compile=True)
    assert torch.equal(gen.generate(ids, 10).tokens, ref)
    assert torch.equal(gen.generate(ids, 10).tokens, ref)  # the compiled step again, cache reset in place
    # A second Generator on a model with another head module compiles its own step (the first
    # one's code, compiled without module guards, would read a weight that is not there).
    other = load_quantized(saved_tiny, dtype=torch.float32, lm_head_bits=8)
    assert torch.equal(Generator(other, max_len=24, compile=True).generate(ids, 10).tokens, greedy(other, ids, 10))
    with decode_threads():
        assert torch.equal(greedy(model, ids, 10, **fast_generate_config(model, compile=True)), ref)


# --- the 4-bit lm_head ----------------------------------------------------------------------------------


def test_4bit_lm_head_is_a_quant_linear_close_to_the_full_one(saved_tiny):
    full = load_quantized(saved_tiny, dtype=torch.float32)
    small = load_quantized(saved_tiny, dtype=torch.float32, lm_head_bits=4)
    head = small.get_output_embeddings()
    assert isinstance(head, QuantLinear) and head.bits == 4 and head.kernel_group_size == 32
    w = full.get_output_embeddings().weight
    err = (head.dequantize() - w).abs().max() / w.abs().max()
    assert 0 < err < 0.1  # 4-bit groups of 32: ~1/30 of the range at most
    ids = tokens(batch=1, seq=8)
    with torch.no_grad():
        a, b = full(ids).logits, small(ids).logits
    assert (a - b).abs().max() < 0.1 * a.abs().max()


def test_4bit_lm_head_refuses_widths_the_groups_do_not_divide(saved_tiny):
    with pytest.raises(ValueError, match="in_features=40 must be a multiple of the head's group size 32"):
        quantize_head_4bit(torch.randn(16, 40), torch.float32)
    with pytest.raises(ValueError, match=r"lm_head_bits=5: use 16 .* or 4 \(4-bit groups\)"):
        load_quantized(saved_tiny, lm_head_bits=5)


# --- the chat path ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bluelm_dir(tmp_path_factory):
    from bluelm_fixtures import make_tiny_bluelm_dir

    return make_tiny_bluelm_dir(str(tmp_path_factory.mktemp("bluelm")))


def test_chat_on_a_4bit_model_fast_and_threaded_gives_the_same_reply(bluelm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bluelm_quant.chat import chat, stream_chat

    model = AutoModelForCausalLM.from_pretrained(bluelm_dir).eval()
    replace_linear(model, QuantConfig(bits=4, group_size=32), quantize=True)
    tok = AutoTokenizer.from_pretrained(bluelm_dir)
    want, history = chat(model, tok, "Tell me about the river.", max_new_tokens=8)
    assert want
    before = torch.get_num_threads()
    assert chat(model, tok, "Tell me about the river.", max_new_tokens=8, threads=2)[0] == want
    assert chat(model, tok, "Tell me about the river.", max_new_tokens=8, fast=True)[0] == want
    assert list(stream_chat(model, tok, "Tell me about the river.", max_new_tokens=8, fast=True))[-1][0] == want
    assert torch.get_num_threads() == before and ops.kernel_threads_setting() == 0  # restored after each turn


def test_chat_tool_bad_thread_and_head_options(bluelm_dir, capsys):
    from bluelm_quant.cli import chat as chat_cli

    for argv, message in ((["--threads", "0"], "argument --threads: 0 is not a positive integer"),
                          (["--lm-head-bits", "8"], "--lm-head-bits 8: " + bluelm_dir + " is not a 4-bit checkpoint")):
        with pytest.raises(SystemExit) as exc:
            chat_cli.main(["--model", bluelm_dir] + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert chat_cli.check_threads(cpu_settings._USABLE_CPUS + 7) == cpu_settings._USABLE_CPUS
    assert f"--threads {cpu_settings._USABLE_CPUS + 7} but this process may run on {cpu_settings._USABLE_CPUS} CPUs" in capsys.readouterr().err


def test_eval_ppl_scores_the_quantized_head_it_is_asked_for(bluelm_dir, capsys, tmp_path):
    """bluelm-eval-ppl --lm-head-bits: the perplexity cost of a quantized head, by one command."""
    import shutil

    from transformers import AutoModelForCausalLM

    from bluelm_quant.cli import eval_ppl as eval_cli

    model = AutoModelForCausalLM.from_pretrained(bluelm_dir).eval()
    config = QuantConfig(bits=4, group_size=32)
    replace_linear(model, config, quantize=True)
    quant_dir = str(tmp_path / "q")
    save_quantized(model.requires_grad_(False), quant_dir, config)
    for name in os.listdir(bluelm_dir):
        if name.startswith("tokenizer") or name == "special_tokens_map.json":
            shutil.copy(os.path.join(bluelm_dir, name), quant_dir)
    text = tmp_path / "t.txt"
    text.write_text("The river ran through the old town, past the library and the market square. " * 8)
    scores = {}
    for bits in (16, 8, 4):
        assert eval_cli.main(["--model", quant_dir, "--text", str(text), "--seqlen", "32", "--lm-head-bits", str(bits)]) == 0
        scores[bits] = float(capsys.readouterr().out.split()[-1])
    assert scores[8] != scores[16] and scores[4] != scores[16]  # the head was swapped, not ignored
    assert all(abs(scores[b] / scores[16] - 1) < 0.2 for b in (8, 4))
    with pytest.raises(SystemExit) as exc:
        eval_cli.main(["--model", bluelm_dir, "--lm-head-bits", "8"])
    assert exc.value.code == 2 and "is not a 4-bit checkpoint" in capsys.readouterr().err


# --- tools/bench_cpu_vs_llamacpp.py without llama-cpp-python -----------------------------------------------


def test_bench_against_llamacpp_runs_ours_and_says_llamacpp_is_missing(tmp_path, capsys):
    import importlib.util
    import os

    from tiny_models import byte_tokenizer

    spec = importlib.util.spec_from_file_location(
        "bench_vs", os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools", "bench_cpu_vs_llamacpp.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    if bench.llama_cpp_available():
        pytest.skip("llama-cpp-python is installed here: the message under test is not printed")
    model = tiny_llama(seed=5, vocab_size=258)
    config = QuantConfig(bits=4, group_size=32)
    replace_linear(model, config, quantize=True)
    path = str(tmp_path / "q")
    save_quantized(model.requires_grad_(False), path, config)
    byte_tokenizer().save_pretrained(path)
    args = ["--quant", path, "--engines", "ours-eager,llama.cpp", "--rounds", "2", "--prompt", "6", "--new", "4",
            "--lm-head-bits", "8", "--threads", str(cpu_settings._USABLE_CPUS + 1)]
    assert bench.main(args) == 0
    out, err = capsys.readouterr()
    assert bench.LLAMA_CPP_MISSING in err
    assert f"--threads {cpu_settings._USABLE_CPUS + 1} but this process may run on {cpu_settings._USABLE_CPUS} CPUs" in err
    rows = out.splitlines()
    assert rows[1].startswith("ours 4-bit, lm_head 8-bit, eager") and "NOT measured in this run" in rows[2]
    decode = float(rows[1].split("|")[1])
    assert decode > 0
    with pytest.raises(SystemExit):
        bench.main(["--quant", str(tmp_path / "missing")])
    assert "give our 4-bit checkpoint directory" in capsys.readouterr().err


# --- attention for single-position decode steps on the CPU ------------------------------------------------


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_cpu_attention_matches_sdpa(cache):
    """GQA (4 query heads on 2 key/value heads), a left-padded batch, both cache kinds."""
    from bluelm_quant import cpu_attention

    model = tiny_llama(seed=6)
    ids = tokens(batch=2, seq=9)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                  output_scores=True, return_dict_in_generate=True)
    if cache == "static":
        kwargs.update(fast_generate_config(model))
    with torch.no_grad():
        ref = model.generate(ids, **kwargs)
        assert cpu_attention.use(model) and model.config._attn_implementation == cpu_attention.ATTENTION
        got = model.generate(ids, **kwargs)
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.scores, ref.scores):
        assert torch.allclose(a, b, atol=1e-5)
    assert not cpu_attention.use(model)  # already switched: left alone


def _attention_float64(q, k, v, mask, scale):
    """softmax(scale * q k^T + mask) v in float64, key/value heads repeated for their query heads."""
    group = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    s = torch.einsum("bhd,bhtd->bht", q.double(), k) * scale
    if mask is not None:
        s = s.masked_fill(~mask[:, None], float("-inf")) if mask.dtype == torch.bool else s + mask[:, None].double()
    return torch.einsum("bht,bhtd->bhd", torch.softmax(s, -1), v).float()


@pytest.mark.parametrize("isa", ["best", "scalar"])
@pytest.mark.parametrize("shape", [(1, 9, 3, 160, 64), (2, 4, 2, 37, 80), (1, 4, 4, 1, 128), (3, 8, 1, 300, 17)])
def test_decode_attention_op_matches_float64(shape, isa):
    """The extension's single-position attention (cpu_attention.cpp): GQA groups, widths that are
    not multiples of 16, no mask, a bool mask and an additive one, both bodies."""
    b, h, kvh, t, d = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, k, v = torch.randn(b, h, d, generator=gen), torch.randn(b, kvh, t, d, generator=gen), torch.randn(b, kvh, t, d, generator=gen)
    keep = torch.rand(b, t, generator=gen) > 0.3
    keep[:, 0] = True
    before = ops.cpu_isa()
    try:
        ops.set_cpu_isa(isa)
        for mask in (None, keep, torch.randn(b, t, generator=gen)):
            got = torch.ops.bluelm_quant.decode_attention(q, k, v, mask, 0.125)
            torch.testing.assert_close(got, _attention_float64(q, k, v, mask, 0.125), rtol=1e-5, atol=1e-5)
        v[~keep[:, None].expand(b, kvh, t)] = float("nan")  # masked positions' values are never read
        assert not torch.ops.bluelm_quant.decode_attention(q, k, v, keep, 0.125).isnan().any()
        none = torch.zeros(b, t, dtype=torch.bool)  # every position masked: NaN, as SDPA gives
        assert torch.ops.bluelm_quant.decode_attention(q, k, v, none, 0.125).isnan().all()
    finally:
        ops.set_cpu_isa(before)


def test_decode_attention_op_bad_input():
    op = torch.ops.bluelm_quant.decode_attention
    q, k = torch.randn(1, 6, 16), torch.randn(1, 4, 10, 16)
    with pytest.raises(RuntimeError, match=r"shapes do not fit: q \[1, 6, 16\].*with H a multiple of KVH"):
        op(q, k, k, None, 1.0)
    with pytest.raises(RuntimeError, match="q, k and v must be float32 CPU tensors, got BFloat16"):
        op(q.bfloat16(), k[:, :3], k[:, :3], None, 1.0)
    with pytest.raises(RuntimeError, match=r"mask must be a bool \(true = attend\) or float32 \(added\) CPU tensor \[B, T\] = \[1, 10\]"):
        op(q, k[:, :3], k[:, :3], torch.ones(1, 9, dtype=torch.bool), 1.0)


def test_cpu_attention_takes_the_op_for_fp32_and_matmuls_otherwise():
    from bluelm_quant import cpu_attention

    q, k = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 7, 16)
    mask = torch.ones(1, 1, 1, 7, dtype=torch.bool)
    assert cpu_attention._kernel_applies(q, k, k, mask) and cpu_attention._kernel_applies(q, k, k, None)
    assert not cpu_attention._kernel_applies(q.bfloat16(), k.bfloat16(), k.bfloat16(), mask)  # the matmul path
    assert not cpu_attention._kernel_applies(q, k, k, torch.ones(1, 4, 1, 7, dtype=torch.bool))  # a mask per head
    bf16 = cpu_attention.attention(None, q.bfloat16(), k.bfloat16(), k.bfloat16(), mask)[0]
    torch.testing.assert_close(bf16.float(), cpu_attention.attention(None, q, k, k, mask)[0], rtol=0.02, atol=0.02)
    # MATMUL_ATTENTION (for side-by-side runs) computes the same with the matmuls.
    torch.testing.assert_close(cpu_attention.matmul_attention(None, q, k, k, mask)[0],
                               cpu_attention.attention(None, q, k, k, mask)[0], rtol=1e-5, atol=1e-6)


def test_loaded_4bit_model_on_cpu_uses_cpu_attention(saved_tiny):
    from bluelm_quant import cpu_attention

    assert load_quantized(saved_tiny, dtype=torch.float32).config._attn_implementation == cpu_attention.ATTENTION


# --- bad input in the benchmarks: a CPU body this CPU lacks ------------------------------------------------


def test_bench_kernels_times_the_body_that_runs(capsys):
    import importlib.util
    import os
    import sys

    tools = os.path.join(os.path.dirname(os.path.dirname(__file__)), "tools")
    sys.path.insert(0, tools)  # bench_kernels imports bench_kernels_cpu next to it
    try:
        spec = importlib.util.spec_from_file_location("bench_kernels", os.path.join(tools, "bench_kernels.py"))
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(tools)
    assert bench.runnable_bodies(["amx", "avx512", "scalar"], "avx2") == ["avx2", "scalar"]
    err = capsys.readouterr().err
    assert "--isa amx: this CPU runs at most the avx2 body; timing avx2 instead" in err
    assert bench.runnable_bodies(["amx", "avx2"], "amx") == ["amx", "avx2"]
