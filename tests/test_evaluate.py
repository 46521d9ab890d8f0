"""perplexity() against a hand computation on a tiny random LLaMA."""
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bluelm_quant.evaluate import perplexity, text_windows

from tiny_models import byte_tokenizer

TEXT = ("The quick brown fox jumps over the lazy dog. 敏捷的棕色狐狸跳过了懒狗。 " * 8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128)
    return LlamaForCausalLM(config).eval()


def hand_perplexity(model, ids, seqlen, max_windows=None):
    """exp(mean NLL) over non-overlapping windows; the first token of each is context."""
    n = len(ids) // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    nll, count = 0.0, 0
    for w in range(n):
        window = torch.tensor(ids[w * seqlen:(w + 1) * seqlen])
        with torch.no_grad():
            logits = model(window[None]).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)
        for t in range(seqlen - 1):
            nll -= logp[t, window[t + 1]].item()
            count += 1
    return math.exp(nll / count)


def test_matches_hand_computation(model, tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) % 24 != 0  # a trailing partial window must be dropped
    expected = hand_perplexity(model, ids, 24)
    got = perplexity(model, tok, TEXT, seqlen=24, progress=False)
    assert got == pytest.approx(expected, rel=1e-5)
    # A random 257-way model is close to uniform but not exactly.
    assert 150 < got < 400 and got != pytest.approx(257, rel=1e-4)


def test_batching_and_max_windows(model, tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    one = perplexity(model, tok, TEXT, seqlen=16, progress=False)
    three = perplexity(model, tok, TEXT, seqlen=16, batch_size=3, progress=False)
    assert three == pytest.approx(one, rel=1e-5)
    capped = perplexity(model, tok, TEXT, seqlen=16, max_windows=2, progress=False)
    assert capped == pytest.approx(hand_perplexity(model, ids, 16, max_windows=2), rel=1e-5)
    assert capped != pytest.approx(one, rel=1e-6)


def test_windows_are_consecutive(tok):
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    w = text_windows(tok, TEXT, seqlen=10, max_windows=3)
    assert w.tolist() == [ids[0:10], ids[10:20], ids[20:30]]


def test_bf16_model_and_plain_tensor_output(model, tok):
    class Bare(torch.nn.Module):  # a model returning raw logits, in bfloat16
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids):
            return self.inner(input_ids).logits

    bf16 = Bare(LlamaForCausalLM(model.config)).to(torch.bfloat16)
    bf16.inner.load_state_dict(model.state_dict())
    bf16.train()
    got = perplexity(bf16, tok, TEXT, seqlen=24, progress=False)
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert got == pytest.approx(hand_perplexity(bf16.inner, ids, 24), rel=1e-4)
    assert got == pytest.approx(perplexity(model, tok, TEXT, seqlen=24, progress=False), rel=2e-2)
    assert bf16.training  # mode restored


def test_errors(model, tok):
    with pytest.raises(ValueError, match=r"gives 5 tokens, fewer than one window of seqlen=8"):
        perplexity(model, tok, "short", seqlen=8, progress=False)
    with pytest.raises(ValueError, match="seqlen=1"):
        perplexity(model, tok, TEXT, seqlen=1, progress=False)
    with pytest.raises(ValueError, match="max_windows=0"):
        perplexity(model, tok, TEXT, seqlen=8, max_windows=0, progress=False)


def test_no_kv_cache_requested(model, tok):
    seen = []

    class Recording(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, use_cache=True):
            seen.append(use_cache)
            return self.inner(input_ids, use_cache=use_cache)

    perplexity(Recording(model), tok, TEXT, seqlen=64, max_windows=2, progress=False)
    assert seen == [False, False]


def load_tool(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_eval_ppl_tool_full_precision_and_quantized(model, tok, tmp_path, capsys):
    tool = load_tool("eval_ppl")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(TEXT, encoding="utf-8")
    args = ["--model", str(tmp_path / "m"), "--text", str(text), "--seqlen", "24",
            "--device", "cpu"]
    expected = perplexity(model, tok, TEXT, seqlen=24, progress=False)
    assert tool.main(args) == 0
    assert capsys.readouterr().out.strip() == f"perplexity {expected:.4f}"

    # A 4-bit directory is loaded through load_quantized and scores like the in-memory model.
    import copy

    from bluelm_quant.saving import save_quantized
    from bluelm_quant.config import QuantConfig
    from bluelm_quant.nn import replace_linear

    quantized = copy.deepcopy(model)
    config = QuantConfig(bits=4, group_size=32)
    replace_linear(quantized, config, quantize=True)
    save_quantized(quantized, str(tmp_path / "q"), config, tokenizer=tok)
    expected = perplexity(quantized, tok, TEXT, seqlen=24, progress=False)
    assert tool.main(["--model", str(tmp_path / "q")] + args[2:]) == 0
    assert capsys.readouterr().out.strip() == f"perplexity {expected:.4f}"
