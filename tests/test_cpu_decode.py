"""A decoder layer's decode step as two extension ops (bluelm_quant.cpu_decode, issue 14): each op
against the PyTorch arithmetic it replaces, the model's tokens unchanged in every decode loop, the
layer's own forward wherever the ops do not apply, and bad arguments named in one line."""
import pytest
import torch

from bluelm_quant import cpu_decode, extension, ops
from bluelm_quant.config import QuantConfig
from bluelm_quant.fuse import fuse_projections
from bluelm_quant.generate import Generator, fast_generate_config
from bluelm_quant.loading import load_quantized
from bluelm_quant.nn import QuantLinear, replace_linear
from bluelm_quant.quantizer import rtn

from bluelm_fixtures import tiny_model as tiny_bluelm
from tiny_models import save_tiny_4bit, tiny_llama, tokens

pytestmark = [pytest.mark.skipif(not cpu_decode.ops_available(), reason="needs the compiled quant_cuda extension"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return save_tiny_4bit(str(tmp_path_factory.mktemp("cpu_decode") / "q"), seed=7)


@pytest.fixture
def isa():
    """Runs the test with the named CPU body, then restores the best one."""
    chosen = []

    def use(name):
        chosen.append(ops.set_cpu_isa(name))
        if chosen[-1] != name:
            pytest.skip(f"this CPU does not run the {name} body")
        return chosen[-1]

    yield use
    ops.set_cpu_isa("best")


def quant_linear(n, k, gs=32, act_order=False, bias=False, seed=0, scale_columns=None) -> QuantLinear:
    """A random 4-bit Linear [n <- k] with its kernel plan; scale_columns=(c, f): the first c
    output columns' scales times f."""
    gen = torch.Generator().manual_seed(seed)
    qw = rtn(torch.randn(n, k, generator=gen), QuantConfig(group_size=gs, sym=False))
    if act_order:
        qw.g_idx = (torch.argsort(torch.randperm(k, generator=gen)) // gs).to(torch.int32)
    m = QuantLinear.from_quantized(qw, gs, bias=torch.randn(n, generator=gen) if bias else None, dtype=torch.float32)
    if scale_columns:
        with torch.no_grad():
            m.scales[:, : scale_columns[0]] *= scale_columns[1]
    with torch.no_grad():
        m(torch.randn(2, k))  # the first call's self-check, which makes the plan the ops take
    assert isinstance(m._plan, ops.GemmPlan)
    return m


def args(m: QuantLinear) -> list:
    return cpu_decode._kernel_args(m._plan)


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(t, cos, sin):  # t [B, heads, D], cos/sin [B or 1, 1, D]
    half = t.shape[-1] // 2
    return t * cos + torch.cat((-t[..., half:], t[..., :half]), dim=-1) * sin


def close(got, want):
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2e-5 * max(scale, 1.0), (got - want).abs().max().item()


@pytest.mark.parametrize("body", ["avx512", "scalar"])
@pytest.mark.parametrize("batch,cos_rows,act_order,bias", [(1, 1, False, False), (3, 3, True, True), (2, 1, False, True)])
def test_decode_qkv_is_norm_projection_and_rope(isa, body, batch, cos_rows, act_order, bias):
    isa(body)
    hidden, heads, kv_heads, d, eps = 128, 4, 2, 32, 1e-5
    qkv = quant_linear((heads + 2 * kv_heads) * d, hidden, act_order=act_order, bias=bias)
    x, norm = torch.randn(batch, hidden), torch.rand(hidden) + 0.5
    angles = torch.rand(cos_rows, 1, d) * 6
    cos, sin = angles.cos(), angles.sin()
    q, k, v = torch.ops.bluelm_quant.decode_qkv(x, norm, eps, args(qkv), qkv._plan.group_size, cos, sin, heads, kv_heads)
    with torch.no_grad():
        y = qkv(rms_norm(x, norm, eps))
    close(q, rope(y[:, : heads * d].view(batch, heads, d), cos, sin))
    close(k, rope(y[:, heads * d : (heads + kv_heads) * d].view(batch, kv_heads, d), cos, sin))
    close(v, y[:, (heads + kv_heads) * d :].view(batch, kv_heads, d))


@pytest.mark.parametrize("body", ["avx512", "scalar"])
@pytest.mark.parametrize("batch,act_order", [(1, False), (4, True)])
def test_decode_o_mlp_is_the_layer_after_attention(isa, body, batch, act_order):
    isa(body)
    hidden, inner, eps = 128, 256, 1e-6
    o = quant_linear(hidden, hidden, act_order=act_order, seed=1)
    # gates scaled up: SiLU's exponentials on both sides of zero and far from it
    gate_up = quant_linear(2 * inner, hidden, act_order=act_order, seed=2, scale_columns=(inner, 8.0))
    down = quant_linear(hidden, inner, act_order=act_order, bias=True, seed=3)
    x, attn, norm = torch.randn(batch, hidden), torch.randn(batch, hidden), torch.rand(hidden) + 0.5
    got = torch.ops.bluelm_quant.decode_o_mlp(x, attn, args(o), o._plan.group_size, norm, eps, args(gate_up),
                                              gate_up._plan.group_size, args(down), down._plan.group_size)
    with torch.no_grad():
        h = x + o(attn)
        gate, up = gate_up(rms_norm(h, norm, eps)).split(inner, dim=-1)
        want = h + down(torch.nn.functional.silu(gate) * up)
    assert gate.min() < -20 and gate.max() > 20
    close(got, want)


def test_model_decodes_the_same_tokens_through_the_ops(saved_tiny):
    plain = load_quantized(saved_tiny, dtype=torch.float32)
    fused = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fused)
    assert cpu_decode.enable_decode_layers(fused) == 2
    ids = tokens(batch=1, seq=9)
    with torch.inference_mode():
        ref = plain.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
        # model.generate: the dynamic cache, then the static one (the chat's --fast path, eager here)
        assert torch.equal(fused.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0), ref)
        static = fast_generate_config(fused)
        assert torch.equal(fused.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                                          **static), ref)
        # the chat's --fast: transformers compiles the step (no C++ wrapper: generate.fast_generate_config)
        config = fast_generate_config(fused, compile=True)
        assert not (config["compile_config"].options or {}).get("cpp_wrapper")
        assert torch.equal(fused.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0,
                                          **config), ref)
    assert torch.equal(Generator(fused, max_len=24).generate(ids, 12).tokens, ref)
    torch._dynamo.utils.counters.clear()
    compiled = Generator(fused, max_len=24, compile=True)
    assert torch.equal(compiled.generate(ids, 12).tokens, ref)
    with torch.profiler.profile() as prof:
        assert torch.equal(compiled.generate(ids, 12).tokens, ref)
    names = [e.name for e in prof.events()]
    assert names.count("bluelm_quant::decode_qkv") == names.count("bluelm_quant::decode_o_mlp") == 2 * 11  # 11 steps
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]


def op_calls(model, *call_args, **call_kwargs) -> tuple:
    """(output, how many times decode_qkv and decode_o_mlp ran) for one model call."""
    with torch.profiler.profile() as prof:
        out = model(*call_args, **call_kwargs)
    names = [e.name for e in prof.events()]
    return out, names.count("bluelm_quant::decode_qkv"), names.count("bluelm_quant::decode_o_mlp")


def test_ops_run_the_decode_steps_and_logits_agree_to_rounding(saved_tiny):
    plain = load_quantized(saved_tiny, dtype=torch.float32)
    fast = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fast)
    cpu_decode.enable_decode_layers(fast)
    ids = tokens(batch=2, seq=7)
    with torch.inference_mode():
        caches = [None, None]
        outs = []
        for i, model in enumerate((plain, fast)):
            out, qkv_calls, _ = op_calls(model, ids, use_cache=True)
            assert qkv_calls == 0  # the prompt: the layers' own forward (and their kernel plans made)
            caches[i] = out.past_key_values
            step, qkv_calls, mlp_calls = op_calls(model, ids[:, -1:], past_key_values=caches[i], use_cache=True)
            assert (qkv_calls, mlp_calls) == ((0, 0) if model is plain else (2, 2))  # one each per layer
            outs.append(step.logits)
    close(outs[1], outs[0])
    assert not torch.equal(outs[1], outs[0])  # another summation order: the ops really ran


def test_layers_keep_their_own_forward_where_the_ops_do_not_apply(saved_tiny):
    fast = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fast)
    cpu_decode.enable_decode_layers(fast)
    ids = tokens(batch=1, seq=5)
    with torch.inference_mode():
        cache = fast(ids, use_cache=True).past_key_values
    # gradients wanted for the hidden states (no backward through the ops)
    embeds = fast.get_input_embeddings()(ids[:, -1:]).detach().requires_grad_(True)
    _, qkv_calls, _ = op_calls(fast, inputs_embeds=embeds, past_key_values=cache, use_cache=True)
    assert qkv_calls == 0
    # bfloat16 activations: a dtype the ops do not take
    with torch.inference_mode():
        _, qkv_calls, _ = op_calls(fast.to(torch.bfloat16), ids[:, -1:], use_cache=True)
    assert qkv_calls == 0


def test_only_fused_llama_like_layers_are_enabled_and_disable_restores(saved_tiny):
    unfused = load_quantized(saved_tiny, dtype=torch.float32)
    assert cpu_decode.enable_decode_layers(unfused) == 0  # the ops take the fused q/k/v and gate/up
    fast = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fast)
    assert cpu_decode.enable_decode_layers(fast) == 2
    cpu_decode.disable_decode_layers(fast)
    assert all("forward" not in layer.__dict__ for layer in fast.model.layers)
    ids = tokens(batch=1, seq=5)
    with torch.inference_mode():
        cache = fast(ids, use_cache=True).past_key_values
        _, qkv_calls, _ = op_calls(fast, ids[:, -1:], past_key_values=cache, use_cache=True)
    assert qkv_calls == 0


def test_bad_arguments_are_named_in_one_line():
    hidden, heads, kv_heads, d = 128, 4, 2, 32
    qkv = quant_linear((heads + 2 * kv_heads) * d, hidden)
    x, norm, cos = torch.randn(1, hidden), torch.ones(hidden), torch.ones(1, 1, d)
    op = torch.ops.bluelm_quant.decode_qkv
    cases = [
        (lambda: op(x.double(), norm, 1e-5, args(qkv), 32, cos, cos, heads, kv_heads), "x must be a float32 CPU tensor"),
        (lambda: op(x, norm[:-1], 1e-5, args(qkv), 32, cos, cos, heads, kv_heads), "norm_weight must be [H]"),
        (lambda: op(x, norm, 1e-5, args(qkv), 32, cos, cos, heads, 3), "must be a multiple of kv_heads"),
        (lambda: op(x, norm, 1e-5, args(qkv)[:3], 32, cos, cos, heads, kv_heads), "must be [qweight, qzeros, scales"),
        (lambda: op(x, norm, 1e-5, args(qkv), 32, cos, cos, heads + 1, kv_heads - 1), "outputs"),
        (lambda: op(x, norm, 1e-5, args(qkv), 32, torch.ones(3, 1, d), torch.ones(3, 1, d), heads, kv_heads),
         "one row of head_dim"),
    ]
    for call, words in cases:
        with pytest.raises(RuntimeError) as err:
            call()
        first = str(err.value).splitlines()[0]
        assert "bluelm_quant::decode_qkv" in first and words in first, first
    mlp = torch.ops.bluelm_quant.decode_o_mlp
    with pytest.raises(RuntimeError, match="shapes do not chain"):
        mlp(x, x, args(quant_linear(hidden, hidden)), 32, norm, 1e-5, args(quant_linear(96, hidden)), 32,
            args(quant_linear(hidden, 64)), 32)


def quantized(model):
    """The model with every decoder Linear 4-bit (round to nearest, group 32), in memory."""
    replace_linear(model, QuantConfig(bits=4, group_size=32, sym=False), quantize=True)
    return model.requires_grad_(False)


def decode_logits(model, ids, steps=4) -> tuple:
    """Logits of `steps` single-position steps after the prompt ids, and the decode ops' call count."""
    with torch.inference_mode():
        cache = model(ids, use_cache=True).past_key_values
        out, calls = [], 0
        for i in range(steps):
            step, qkv_calls, _ = op_calls(model, ids[:, -1:] if i == 0 else out[-1].argmax(-1), past_key_values=cache,
                                          use_cache=True)
            out.append(step.logits[:, -1:])
            calls += qkv_calls
    return torch.cat(out, 1), calls


@pytest.mark.parametrize("family", ["bluelm", "llama-head-dim-bias"])
def test_bluelm_and_llama_variants_run_the_ops(family):
    """BlueLM's own layer classes; a LLaMA whose head_dim is not hidden / heads, with biases everywhere."""
    make = {"bluelm": lambda: tiny_bluelm(seed=3),
            "llama-head-dim-bias": lambda: tiny_llama(seed=3, head_dim=32, attention_bias=True, mlp_bias=True)}[family]
    plain, fast = quantized(make()), quantized(make())
    assert torch.equal(plain.model.layers[0].self_attn.o_proj.qweight, fast.model.layers[0].self_attn.o_proj.qweight)
    fuse_projections(fast)
    assert cpu_decode.enable_decode_layers(fast) == 2
    ids = tokens(batch=1, seq=6, vocab=100)
    want, _ = decode_logits(plain, ids)
    got, calls = decode_logits(fast, ids)
    assert calls == 4 * 2
    close(got, want)


def test_what_the_ops_would_skip_keeps_the_layers_own_forward(saved_tiny):
    """Hooks, replaced modules, output_attentions, autocast and gradients: the layer's own forward."""
    fast = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fast)
    cpu_decode.enable_decode_layers(fast)
    ids = tokens(batch=1, seq=5)
    layer = fast.model.layers[0]

    def qkv_calls(**kwargs):
        with torch.inference_mode():
            cache = fast(ids, use_cache=True).past_key_values
            out, calls, _ = op_calls(fast, ids[:, -1:], past_key_values=cache, use_cache=True, **kwargs)
        return out, calls

    assert qkv_calls()[1] == 2
    seen = []
    handle = layer.self_attn.o_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    assert qkv_calls()[1] == 1 and seen  # layer 0 ran its own forward and the hook saw its o_proj
    handle.remove()
    assert qkv_calls()[1] == 2
    original = layer.post_attention_layernorm
    layer.post_attention_layernorm = type(original)(original.weight.shape[0], eps=original.variance_epsilon)
    assert qkv_calls()[1] == 1  # the replaced norm is used, not the one the ops were given
    layer.post_attention_layernorm = original
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert qkv_calls()[1] == 0
    with torch.no_grad():
        cache = fast(ids, use_cache=True).past_key_values
    _, calls, _ = op_calls(fast, ids[:, -1:], past_key_values=cache, use_cache=True)  # gradients enabled
    assert calls == 0
    # last: transformers hooks the attention modules to collect attentions, and the hooks stay
    fast.set_attn_implementation("eager")  # the attention that returns its weights
    out, calls = qkv_calls(output_attentions=True)
    assert calls == 0 and len(out.attentions) == 2
