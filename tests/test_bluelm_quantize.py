"""Quantizing BlueLM end to end: tools/quantize.py on a tiny random BlueLM directory (calibration
from the bundled texts, tokenized by the BlueLM SentencePiece tokenizer), then load the 4-bit
checkpoint and chat with it - through the library and through tools/chat.py."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bluelm_fixtures import SP_VOCAB, make_tiny_bluelm_dir, reference_greedy, tiny_config
from bluelm_quant.chat import ChatError, chat, encode_prompt
from bluelm_quant.loading import load_quantized
from bluelm_quant.hf import load_model_and_tokenizer
from bluelm_quant.models import BLUELM, spec_for
from bluelm_quant.models.bluelm import BlueLMForCausalLM
from bluelm_quant.nn import QuantLinear

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUMAN_ID = SP_VOCAB  # where the fixture's tokenizer_config.json puts [|Human|]:
GREEDY = dict(do_sample=False, max_new_tokens=8)
ENV = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bluelm_quantize")
    src = make_tiny_bluelm_dir(str(root / "tiny-bluelm"), seed=3)
    out = str(root / "tiny-bluelm-gptq")
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "quantize.py"), "--model", src, "--out", out,
         "--nsamples", "8", "--seqlen", "32", "--group-size", "32", "--eval-windows", "0", "-q"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Quantized 2 layers" in run.stdout
    return src, out


def test_spec_matches_the_bluelm_modules():
    """The family spec names real modules: what runs before layer 0, and every Linear of a layer
    exactly once, in forward order (q/k/v share the input, then o, gate/up, down)."""
    model = BlueLMForCausalLM(tiny_config()).eval()
    assert spec_for(model.config) is BLUELM
    assert spec_for(AutoConfig.for_model("BlueLM")) is BLUELM
    for name in BLUELM.before:
        model.get_submodule(name)  # raises AttributeError if the name is wrong
    layer = model.get_submodule(BLUELM.layers)[0]
    linears = [n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sorted(n for group in BLUELM.sequential for n in group) == sorted(linears)
    # Everything with weights outside the layers is either run before them or after them.
    outside = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if not n.startswith(BLUELM.layers + ".")}
    assert outside == {"model.embed_tokens", "model.embed_layer_norm", "model.norm", "lm_head"}
    assert outside - set(BLUELM.before) == set(BLUELM.after) == {"model.norm", "lm_head"}


def test_cli_writes_a_bluelm_gptq_checkpoint(dirs):
    src, out = dirs
    files = set(os.listdir(out))
    assert {"config.json", "quantize_config.json", "model.safetensors.index.json", "model-00001-of-00001.safetensors",
            "tokenizer.model", "tokenizer_config.json", "quantize_report.json"} <= files
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["model_type"] == "BlueLM" and config["architectures"] == ["BlueLMForCausalLM"]
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_bluelm.BlueLMForCausalLM"  # kept for other tools
    assert config["quantization_config"]["quant_method"] == "gptq"
    with open(os.path.join(out, "quantize_config.json"), encoding="utf-8") as f:
        qc = json.load(f)
    # Static act-order (the default) is the plain layout: desc_act false, meta records it.
    assert (qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == (4, 32, False, True)
    assert qc["meta"]["act_order"] == "static"


def test_quantized_bluelm_is_close_to_full_precision(dirs):
    src, out = dirs
    fp = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    q = load_quantized(out, dtype=torch.float32)
    assert type(q) is BlueLMForCausalLM
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * q.config.num_hidden_layers and not isinstance(q.lm_head, QuantLinear)
    # The stable-embedding LayerNorm is carried over unquantized (loaded before layer 0 by the spec),
    # in 16 bits: the source is float32, the checkpoint bfloat16.
    torch.testing.assert_close(q.model.embed_layer_norm.bias, fp.model.embed_layer_norm.bias.bfloat16().float())
    for name, layer in q.named_modules():
        if isinstance(layer, QuantLinear):
            w, w_q = fp.get_submodule(name).weight, layer.dequantize()
            assert 0 < (w_q - w).norm() / w.norm() < 0.25, name  # really quantized, and not garbage
    ids = torch.randint(4, SP_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = fp(ids).logits, q(ids).logits
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_two_turn_chat_with_the_4bit_model(dirs):
    _, out = dirs
    model, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    reply1, history = chat(model, tok, "Tell me about the river.", **GREEDY)
    reply2, history = chat(model, tok, "And the library?", history, **GREEDY)
    assert [q for q, _ in history] == ["Tell me about the river.", "And the library?"]
    # Turn 2 is exactly greedy decoding of the re-encoded conversation on the 4-bit model.
    prompt = encode_prompt(model, tok, "And the library?", [("Tell me about the river.", reply1)])
    assert prompt.count(HUMAN_ID) == 2
    expected = reference_greedy(model, prompt, {2, HUMAN_ID}, GREEDY["max_new_tokens"])
    assert reply2 == tok.decode(expected, skip_special_tokens=True).strip()
    assert expected  # the model said something, so the comparison means something


def test_chat_prompt_longer_than_the_context(dirs):
    _, out = dirs
    model, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    model.config.max_position_embeddings = 48
    with pytest.raises(ChatError, match="nothing is left to drop"):
        chat(model, tok, "the river behind the old library " * 12, [("a", "b")], **GREEDY)


def test_tools_chat_on_the_4bit_dir(dirs):
    _, out = dirs
    stdin = "Tell me about the river.\nAnd the library?\n/exit\n"
    run = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "chat.py"), "--model", out, "--device", "cpu",
         "--dtype", "float32", "--max-new-tokens", "8", "--verbose"],
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO, env=ENV,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    counts = [line for line in run.stderr.splitlines() if line.startswith("[prompt:")]
    assert len(counts) == 2 and counts[1].endswith("1 past turns]")
    replies = [part.split("\n")[0] for part in run.stdout.split("AI: ")[1:]]
    model, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    reply1, history = chat(model, tok, "Tell me about the river.", **GREEDY)
    assert replies == [reply1, chat(model, tok, "And the library?", history, **GREEDY)[0]]
