"""BlueLM modeling checked without real weights: against transformers' LLaMA, against the
docs/BLUELM.md formulas, cache vs full forward, and load paths without trust_remote_code."""
import json
import math
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import bluelm_quant  # noqa: F401  (registers BlueLM with the Auto classes)
from bluelm_fixtures import REMOTE_AUTO_MAP, add_remote_auto_map, tiny_config, tiny_model
from bluelm_quant.modeldir import ModelDir
from bluelm_quant.models.bluelm import BlueLMConfig, BlueLMConfigError, BlueLMForCausalLM
from bluelm_quant.shards import CheckpointError

SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, rms_norm_eps=1e-6)


def llama_twin(model: BlueLMForCausalLM) -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=model.config.vocab_size, pad_token_id=3, **SHAPE)
    llama = LlamaForCausalLM(config).eval()
    state = {k: v for k, v in model.state_dict().items() if "embed_layer_norm" not in k}
    llama.load_state_dict(state, strict=True)  # same key names as BlueLM's checkpoints
    return llama


def stable_embedding(model: BlueLMForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    """docs/BLUELM.md: LayerNorm with weight and bias, eps = rms_norm_eps, right after embed_tokens."""
    x = model.model.embed_tokens.weight[ids].double()
    ln = model.model.embed_layer_norm
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + model.config.rms_norm_eps)
    return (y * ln.weight.double() + ln.bias.double()).float()


def test_plain_bluelm_equals_llama():
    model = tiny_model(use_stable_embedding=False, **SHAPE)
    assert not hasattr(model.model, "embed_layer_norm")
    llama = llama_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, llama(ids).logits, rtol=0, atol=1e-6)
    greedy = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(ids[:1], **greedy), llama.generate(ids[:1], **greedy))


def test_stable_embedding_layernorm_matches_formula():
    model = tiny_model(use_stable_embedding=True, **SHAPE)
    names = {k for k in model.state_dict() if "embed_layer_norm" in k}
    assert names == {"model.embed_layer_norm.weight", "model.embed_layer_norm.bias"}
    llama = llama_twin(model)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        ours = model(ids).logits
        reference = llama(inputs_embeds=stable_embedding(model, ids)).logits
        without = llama(ids).logits
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (ours - without).abs().max() > 1e-2  # the LayerNorm really is applied


def test_rmsnorm_fp32_variance_and_weight_dtype():
    model = tiny_model(**SHAPE).to(torch.bfloat16)
    norm = model.model.norm
    x = torch.randn(3, 64, dtype=torch.bfloat16) * 300  # squares overflow bf16 precision
    xf = x.float()
    expected = (xf / torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * norm.weight
    out = norm(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    # docs/BLUELM.md: the normalized value is cast to the *weight* dtype (LLaMA casts to the input's).
    out = norm(xf)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_ntkmixed_inverse_frequencies_match_formula():
    theta, d, k, b = 10000.0, 128, 16.0, 0.3
    config = BlueLMConfig(hidden_size=4096, num_attention_heads=32, rope_theta=theta,
                          rope_scaling={"type": "ntkmixed", "factor": k, "power": b})
    model_rope = bluelm_quant.models.bluelm.modeling_bluelm.BlueLMRotaryEmbedding(config)
    a = math.log(k) / (d / 2) ** b
    expected = torch.tensor([theta ** (-2 * j / d) / math.exp(a * (j + 1) ** b) for j in range(d // 2)],
                            dtype=torch.float64)
    torch.testing.assert_close(model_rope.inv_freq.double(), expected, rtol=1e-6, atol=0)
    # Static table over 2048 * int(k) positions: rows of cat(freqs, freqs).cos()/sin().
    assert config.context_length == 2048 * int(k) == 32768
    positions = torch.tensor([[0, 1, 2047, 2048, 20000, 32767]])
    cos, sin = model_rope(torch.zeros(1, dtype=torch.float32), positions)
    freqs = positions[0, :, None].double() * expected[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    torch.testing.assert_close(cos[0].double(), emb.cos(), rtol=0, atol=2e-3)
    torch.testing.assert_close(sin[0].double(), emb.sin(), rtol=0, atol=2e-3)


def test_linear_and_dynamic_scaling_have_standard_meaning():
    base = tiny_model(**SHAPE).model.rotary_emb.inv_freq
    linear = tiny_model(rope_scaling={"type": "linear", "factor": 4.0}, **SHAPE).model.rotary_emb
    torch.testing.assert_close(linear.inv_freq, base / 4.0)
    dynamic = tiny_model(rope_scaling={"type": "dynamic", "factor": 2.0}, **SHAPE)
    rope = dynamic.model.rotary_emb
    torch.testing.assert_close(rope.inv_freq, base)  # unchanged inside max_position_embeddings
    with torch.no_grad():
        dynamic(torch.randint(0, 100, (1, 300)))  # longer than 256 positions: base grows (NTK)
    assert (rope.inv_freq[1:] < base[1:]).all()


@pytest.mark.parametrize("scaling, message", [
    ({"type": "yarn", "factor": 4.0}, "unknown rope_scaling type 'yarn'"),
    ({"type": "ntkmixed", "factor": 16.0}, r"missing \['power'\]"),
    ({"type": "linear", "factor": 0.5}, "factor must be a number >= 1"),
    ({"type": "linear", "factor": "2"}, "factor must be a number >= 1"),
    ({"type": "ntkmixed", "factor": 16.0, "power": 0.3, "alpha": 1}, r"unexpected \['alpha'\]"),
    ("ntkmixed", "must be null or a dict"),
])
def test_bad_rope_scaling_is_a_clear_error(scaling, message, tmp_path):
    with pytest.raises(BlueLMConfigError, match=message):
        tiny_config(rope_scaling=scaling)
    tiny_model(**SHAPE).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config.pop("rope_parameters")
    config["rope_scaling"] = scaling
    path.write_text(json.dumps(config))
    with pytest.raises(BlueLMConfigError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _full_logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits


@pytest.mark.parametrize("scaling", [None, {"type": "ntkmixed", "factor": 4.0, "power": 0.3}])
def test_incremental_decoding_matches_full_forward(scaling):
    model = tiny_model(rope_scaling=scaling, **SHAPE)
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    full = _full_logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :8], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        out = model(ids[:, 8:11], past_key_values=cache, use_cache=True)  # a chunk of 3
        steps.append(out.logits)
        for t in range(11, 14):  # then one token at a time
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    assert cache.get_seq_length() == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


def test_generate_with_cache_equals_no_cache_greedy_loop():
    model = tiny_model(**SHAPE)
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    ids = prompt
    for _ in range(8):
        ids = torch.cat([ids, _full_logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert torch.equal(out, ids)


def test_left_padded_batch_generates_like_single_prompts():
    model = tiny_model(**SHAPE)
    a = torch.randint(4, 600, (1, 9))
    b = torch.randint(4, 600, (1, 5))
    batch = torch.cat([a, torch.cat([torch.full((1, 4), 3), b], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    greedy = dict(max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=3)
    out = model.generate(batch, attention_mask=mask, **greedy)
    assert torch.equal(out[0, 9:], model.generate(a, **greedy)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, **greedy)[0, 5:])


def test_sampling_and_repetition_penalty_run():
    model = tiny_model(**SHAPE)
    prompt = torch.randint(4, 600, (1, 5))
    out = model.generate(prompt, max_new_tokens=6, do_sample=True, top_p=0.8, top_k=50,
                         temperature=1.0, repetition_penalty=1.1, eos_token_id=None)
    assert out.shape == (1, 11) and torch.equal(out[:, :5], prompt)


def test_save_and_automodel_load_without_trust_remote_code(tmp_path):
    model = tiny_model(rope_scaling={"type": "ntkmixed", "factor": 4.0, "power": 0.3}, **SHAPE)
    model.save_pretrained(tmp_path)
    add_remote_auto_map(str(tmp_path))  # published configs point at remote .py files...
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".py")]  # ...which are absent
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is BlueLMConfig and config.auto_map == REMOTE_AUTO_MAP
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is BlueLMForCausalLM
    assert loaded.config.rope_type == "ntkmixed"
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    ids = torch.randint(0, 600, (1, 10))
    torch.testing.assert_close(_full_logits(loaded, ids), _full_logits(model, ids), rtol=0, atol=0)
    # Even an explicit trust_remote_code=True keeps our registered classes (nothing to fetch).
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)) is BlueLMForCausalLM


def test_published_config_keys_are_read(tmp_path):
    published = {
        "architectures": ["BlueLMForCausalLM"], "auto_map": REMOTE_AUTO_MAP, "model_type": "BlueLM",
        "vocab_size": 100096, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "max_position_embeddings": 2048, "use_stable_embedding": True, "torch_dtype": "bfloat16",
        "rope_scaling": {"type": "ntkmixed", "factor": 16.0, "power": 0.3}, "tie_word_embeddings": False,
        "pad_token_id": 3, "bos_token_id": 1, "eos_token_id": 2, "use_cache": True,
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    config = AutoConfig.from_pretrained(tmp_path)
    assert type(config) is BlueLMConfig
    assert config.use_stable_embedding and config.rope_type == "ntkmixed" and config.head_dim == 128
    assert config.rope_parameters["rope_theta"] == 10000 and config.num_key_value_heads == 32
    assert config.dtype == torch.bfloat16 and config.context_length == 32768


def test_vocab_rows_come_from_checkpoint(tmp_path):
    model = tiny_model(**SHAPE)  # 704 rows
    model.save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["vocab_size"] = 800  # what the published config says vs. what the tensors hold
    path.write_text(json.dumps(config))
    assert ModelDir(tmp_path).embedding_rows == 704
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.vocab_size == 704
    ids = torch.randint(0, 704, (1, 7))
    torch.testing.assert_close(_full_logits(loaded, ids), _full_logits(model, ids), rtol=0, atol=0)


def test_vocab_rows_sharded_and_torch_bin(tmp_path):
    model = tiny_model(**SHAPE)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert ModelDir(tmp_path / "sharded").embedding_rows == 704
    model.config.save_pretrained(tmp_path / "bin")
    state = dict(model.state_dict())
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert ModelDir(tmp_path / "bin").embedding_rows == 704
    state["lm_head.weight"] = state["lm_head.weight"][:700]
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="704 rows but lm_head.weight"):
        ModelDir(tmp_path / "bin").embedding_rows
    with pytest.raises(CheckpointError, match="not a directory"):
        ModelDir(tmp_path / "missing")
