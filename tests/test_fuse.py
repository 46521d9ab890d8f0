"""q/k/v and gate/up as one kernel call each (bluelm_quant.fuse, issue 14): the fused model computes
exactly what the unfused one does, eager and compiled, and refuses to be saved."""
import pytest
import torch

from bluelm_quant import extension
from bluelm_quant.config import QuantConfig
from bluelm_quant.fuse import FusedMember, _fusable, fuse_layers, fuse_projections
from bluelm_quant.generate import Generator, decode_threads, fast_generate_config
from bluelm_quant.loading import load_quantized
from bluelm_quant.nn import QuantLinear
from bluelm_quant.quantizer import rtn
from bluelm_quant.saving import save_quantized

from tiny_models import save_tiny_4bit, tiny_llama, tokens

pytestmark = [pytest.mark.skipif(extension.quant_cuda() is None, reason="needs the compiled quant_cuda extension"),
              pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    return save_tiny_4bit(str(tmp_path_factory.mktemp("fuse") / "q"), seed=5)


def layer(n, k=128, gs=32, g_idx=None, seed=0, bias=False):
    gen = torch.Generator().manual_seed(seed)
    qw = rtn(torch.randn(n, k, generator=gen), QuantConfig(group_size=gs, sym=False))
    if g_idx is not None:
        qw.g_idx = g_idx
    return QuantLinear.from_quantized(qw, gs, bias=torch.randn(n, generator=gen) if bias else None, dtype=torch.float32)


@pytest.mark.parametrize("act_order", [False, True])
def test_fused_layer_is_the_members_side_by_side_bit_for_bit(act_order):
    k, gs = 128, 32
    g_idx = (torch.argsort(torch.randperm(k, generator=torch.Generator().manual_seed(3))) // gs).to(torch.int32)
    members = [layer(n, k, gs, g_idx if act_order else None, seed=i, bias=True) for i, n in enumerate((64, 32, 32))]
    assert (members[0].kernel_perm is not None) == act_order
    assert _fusable(members)
    fused = fuse_layers(members)
    with torch.no_grad():
        for rows in (1, 3, 40):  # the M=1 body, small batches, a prefill
            x = torch.randn(rows, k)
            assert torch.equal(fused(x), torch.cat([m(x) for m in members], dim=-1))


def test_layers_that_differ_are_not_fused():
    k, gs = 128, 32
    perm = lambda seed: (torch.argsort(torch.randperm(k, generator=torch.Generator().manual_seed(seed))) // gs).to(torch.int32)  # noqa: E731
    assert not _fusable([layer(32, k, gs, perm(1)), layer(32, k, gs, perm(2), seed=1)])  # other act-order permutations
    assert not _fusable([layer(32, k, gs), layer(32, k, 64, seed=1)])  # other group sizes
    assert not _fusable([layer(32, k, gs), layer(32, k, gs, seed=1, bias=True)])
    assert not _fusable([layer(32, k, gs), torch.nn.Linear(k, 32)])
    assert not _fusable([layer(32, k, gs), layer(32, k, gs, seed=1).to(torch.bfloat16)])  # other dtypes
    assert not _fusable([layer(32, k, gs), layer(32, 2 * k, gs, seed=1)])  # other inputs


def test_fused_model_gives_the_unfused_logits_and_tokens(saved_tiny):
    plain = load_quantized(saved_tiny, dtype=torch.float32)
    fused = load_quantized(saved_tiny, dtype=torch.float32)
    assert fuse_projections(fused) == 2 * 2  # (q, k, v) and (gate, up) in each of 2 layers
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedMember) and attn.q_proj.group is attn.k_proj.group
    assert sum(isinstance(m, QuantLinear) for m in fused.modules()) == 2 * 4  # qkv, o, gate/up, down: once each
    ids = tokens(batch=2, seq=12)
    with torch.inference_mode():
        assert torch.equal(fused(ids).logits, plain(ids).logits)
    assert attn.q_proj.group.memo is None  # every member took its columns: nothing kept past the forward
    ids = ids[:1]
    with torch.inference_mode():
        ref = plain.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0)
    torch._dynamo.utils.counters.clear()
    gen = Generator(fused, max_len=24, compile=True)
    assert torch.equal(gen.generate(ids, 10).tokens, ref)
    assert torch.equal(gen.generate(ids, 10).tokens, ref)  # the compiled step again
    # The memo is step-local to dynamo: one graph for all the steps, no recompile, no graph break.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch.equal(Generator(fused, max_len=24).generate(ids, 10).tokens, ref)
    with decode_threads(), torch.inference_mode():  # model.generate, static cache, compiled (the chat --fast path)
        out = fused.generate(ids, max_new_tokens=10, min_new_tokens=10, do_sample=False, pad_token_id=0,
                             **fast_generate_config(fused, compile=True))
    assert torch.equal(out, ref)


def test_the_fused_product_is_computed_once_per_input_and_members_out_of_turn_get_their_own(saved_tiny):
    plain = load_quantized(saved_tiny, dtype=torch.float32)
    fused = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fused)
    a, b = plain.model.layers[1].self_attn, fused.model.layers[1].self_attn
    runs = []
    b.q_proj.group.layer.register_forward_hook(lambda *_: runs.append(1))
    x, x1, x2 = torch.randn(1, 3, 64), torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    with torch.no_grad():
        assert [torch.equal(b.q_proj(x), a.q_proj(x)), torch.equal(b.k_proj(x), a.k_proj(x)),
                torch.equal(b.v_proj(x), a.v_proj(x))] == [True] * 3
        assert len(runs) == 1 and b.q_proj.group.memo is None  # once for the three; nothing kept after
        assert torch.equal(b.k_proj(x), a.k_proj(x)) and torch.equal(b.k_proj(x), a.k_proj(x))
        assert len(runs) == 3  # the same member twice: a second forward, computed again
        assert torch.equal(b.q_proj(x1), a.q_proj(x1))
        assert torch.equal(b.k_proj(x2), a.k_proj(x2))  # another input: recomputed
        x2.mul_(2)  # changed in place: its version moved on
        assert torch.equal(b.v_proj(x2), a.v_proj(x2))
        assert len(runs) == 6


def test_full_precision_unknown_and_already_fused_models_are_left_alone(saved_tiny):
    fused = load_quantized(saved_tiny, dtype=torch.float32)
    assert fuse_projections(fused) == 4 and fuse_projections(fused) == 0  # a second call finds nothing to fuse
    model = tiny_llama(seed=1)
    assert fuse_projections(model) == 0
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    model.config.model_type = "not-a-family"
    assert fuse_projections(model) == 0


def test_a_fused_model_refuses_to_be_saved(saved_tiny, tmp_path):
    fused = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fused)
    with pytest.raises(RuntimeError, match=r"model.layers.0.self_attn.q_proj is fused .* load the checkpoint again"):
        fused.state_dict()
    with pytest.raises(RuntimeError, match="is fused with its neighbours"):
        save_quantized(fused, str(tmp_path / "out"), QuantConfig(bits=4, group_size=32, sym=False))
    assert not (tmp_path / "out").exists()


def test_lora_refuses_a_fused_model_and_fusing_refuses_a_peft_model(saved_tiny):
    peft = pytest.importorskip("peft")
    from bluelm_quant import lora

    fused = load_quantized(saved_tiny, dtype=torch.float32)
    fuse_projections(fused)
    with pytest.raises(lora.LoRAError, match="q_proj is fused with its neighbours .* LoRA needs the separate Linears"):
        lora.get_peft_model(fused, peft.LoraConfig(r=4, target_modules="all-linear"))
    tuned = lora.get_peft_model(load_quantized(saved_tiny, dtype=torch.float32), peft.LoraConfig(r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="this is a PEFT model, whose LoRA layers need the separate"):
        fuse_projections(tuned)
