"""The two published BlueLM 4-bit layouts (docs/BLUELM.md section 4), written in miniature with
the exact file names, key names, dtypes, index files and config keys, then loaded and checked
against the same model's dequantized full-precision forward.

- BlueLM-7B-Chat-4bits ("legacy"): pytorch_model-0000N-of-00003.bin + pytorch_model.bin.index.json,
  qweight/qzeros/scales only, fp32 scales, no g_idx, no bias, no quantize_config.json, config.json
  carrying at most a bit-width key; embedding rows (100008) != config vocab_size (100096).
- BlueLM-7B-Chat-32K-GPTQ: model-0000N-of-00003.safetensors + model.safetensors.index.json +
  quantize_config.json (AutoGPTQ keys), fp16 scales, g_idx, an all-zero bias, ntkmixed RoPE and
  the extra special tokens [SEH] / [SEA].

Scaled down: SentencePiece vocabulary 700 (100000), chat tokens from 700, config vocab 1024 (100096).
"""
import json
import logging
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from bluelm_fixtures import REMOTE_AUTO_MAP, SP_VOCAB, tiny_model, trained_sp_model
from bluelm_quant import hf
from bluelm_quant.loading import load_quantized
from bluelm_quant.config import QuantConfig
from bluelm_quant.hf import is_quantized_dir, load_model_and_tokenizer, tokenizer_vocab_mismatch
from bluelm_quant.models.bluelm import BlueLMConfig, BlueLMForCausalLM, BlueLMTokenizerError
from bluelm_quant.models.bluelm.modeling_bluelm import default_inv_freq
from bluelm_quant.nn import QuantLinear
from bluelm_quant.packing import pack_qweight, pack_qzeros
from bluelm_quant.quantizer import QuantizedWeight, rtn
from bluelm_quant.shards import CheckpointError

CHAT_2K = ("[|Human|]:", "[|AI|]:")
CHAT_32K = CHAT_2K + ("[SEH]", "[SEA]")
CONFIG_VOCAB = 1024  # the published configs' 100096, scaled down
LEGACY_ROWS = 704  # 100008 scaled down: SentencePiece + 2 chat tokens, rounded up to a multiple of 8
GPTQ_ROWS = 768  # the 32K tensors: SentencePiece + 4 chat tokens, rounded up to a multiple of 128
NTKMIXED = {"type": "ntkmixed", "factor": 16.0, "power": 0.3}
GROUP = 32  # in_features are 64 and 128: 2 and 4 groups


pytestmark = pytest.mark.usefixtures("one_thread")


# --- writing the published layouts ------------------------------------------------------


def published_config(model: BlueLMForCausalLM, rope_scaling=None, **extra) -> dict:
    """config.json as the remote-code repositories ship it (rope_scaling, not rope_parameters)."""
    c = model.config
    config = {
        "architectures": ["BlueLMForCausalLM"],
        "auto_map": REMOTE_AUTO_MAP,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": c.intermediate_size,
        "max_position_embeddings": 2048,
        "model_type": "BlueLM",
        "num_attention_heads": c.num_attention_heads,
        "num_hidden_layers": c.num_hidden_layers,
        "rms_norm_eps": 1e-6,
        "rope_scaling": rope_scaling,
        "rope_theta": 10000,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.33.1",
        "use_cache": True,
        "use_stable_embedding": True,
        "vocab_size": CONFIG_VOCAB,
    }
    config.update(extra)
    return config


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_published_tokenizer(out: str, chat_tokens, sp_model: str | None = None) -> None:
    """tokenizer.model + the 2023-style tokenizer_config.json (remote tokenizer class, AddedToken
    dicts, no added_tokens_decoder) + added_tokens.json + special_tokens_map.json."""
    shutil.copyfile(sp_model or trained_sp_model(), os.path.join(out, "tokenizer.model"))
    added = {token: SP_VOCAB + i for i, token in enumerate(chat_tokens)}
    extra_special = [t for t in chat_tokens if t not in CHAT_2K]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "auto_map": {"AutoTokenizer": ["tokenization_bluelm.BlueLMTokenizer", None]},
        "bos_token": _added_token("<s>"),
        "clean_up_tokenization_spaces": False,
        "eos_token": _added_token("</s>"),
        "model_max_length": 2048 if not extra_special else 32768,
        "pad_token": None,
        "sp_model_kwargs": {},
        "tokenizer_class": "BlueLMTokenizer",
        "unk_token": _added_token("<unk>"),
    }
    special_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    if extra_special:
        config["additional_special_tokens"] = extra_special
        special_map["additional_special_tokens"] = extra_special
    for name, content in (("tokenizer_config.json", config), ("added_tokens.json", added),
                          ("special_tokens_map.json", special_map)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            json.dump(content, f, indent=2, ensure_ascii=False)


def quantize_weight(w: torch.Tensor, config: QuantConfig, scale_dtype, act_order: bool, seed: int) -> QuantizedWeight:
    """Round-to-nearest, optionally with an act-order style g_idx (a column permutation): the
    grid is found on the permuted columns, codes are stored in the original column order."""
    n, k = w.shape
    if not act_order:
        return rtn(w, config, scale_dtype=scale_dtype)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    q = rtn(w[:, perm], config, scale_dtype=scale_dtype)
    codes = torch.empty_like(q.codes)
    codes[:, perm] = q.codes
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[perm] = q.g_idx
    return QuantizedWeight(codes=codes, scales=q.scales, zeros=q.zeros, g_idx=g_idx, bits=q.bits)


def quantized_state(model, config: QuantConfig, scale_dtype, with_g_idx: bool, with_bias: bool, act_order=False):
    """(checkpoint tensors, reference full-precision state dict).

    Decoder-layer Linears become qweight/qzeros/scales[/g_idx/bias]; everything else is stored in
    bfloat16 (torch_dtype of the published configs). The reference holds exactly what the 4-bit
    checkpoint means: the dequantized weights and the bf16-rounded rest, in fp32."""
    state, reference = {}, {}
    for i, (name, t) in enumerate(model.state_dict().items()):
        module = name.rsplit(".", 1)[0]
        if ".layers." in name and name.endswith("_proj.weight"):
            qw = quantize_weight(t, config, scale_dtype, act_order, seed=i)
            state[f"{module}.qweight"] = pack_qweight(qw.codes.T, config.bits)
            state[f"{module}.qzeros"] = pack_qzeros(qw.zeros, config.bits, "gptq")
            state[f"{module}.scales"] = qw.scales.to(scale_dtype)
            if with_g_idx:
                state[f"{module}.g_idx"] = qw.g_idx.to(torch.int32)
            if with_bias:
                state[f"{module}.bias"] = torch.zeros(t.shape[0], dtype=torch.float16)
            reference[name] = qw.dequantize()
        else:
            state[name] = t.to(torch.bfloat16)
            reference[name] = state[name].float()
    return state, reference


def three_shards(keys: list[str]) -> list[list[str]]:
    """Split in state-dict order, as save_pretrained shards: embeddings first, lm_head last."""
    size = -(-len(keys) // 3)
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def write_legacy_4bits(out: str, model, group_size=GROUP, bit_key: dict | None = None, sym: bool = False) -> dict:
    """The BlueLM-7B-Chat-4bits layout (asymmetric zeros unless `sym`); returns the reference state dict."""
    os.makedirs(out)
    config = QuantConfig(bits=4, group_size=group_size, sym=sym)
    # The original quant_cuda kernel only ran fp32 scales; no g_idx, no bias.
    state, reference = quantized_state(model, config, torch.float32, with_g_idx=False, with_bias=False)
    for i in range(model.config.num_hidden_layers):  # RoPE caches saved by 2023-era code
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(model.config.head_dim // 2)
    weight_map, total = {}, 0
    for i, part in enumerate(three_shards(list(state)), 1):
        fname = f"pytorch_model-{i:05d}-of-00003.bin"
        torch.save({k: state[k] for k in part}, os.path.join(out, fname))
        weight_map.update({k: fname for k in part})
        total += sum(state[k].numel() * state[k].element_size() for k in part)
    with open(os.path.join(out, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(published_config(model, **(bit_key or {})), f, indent=2)
    write_published_tokenizer(out, CHAT_2K)
    return reference


AUTOGPTQ_QUANTIZE_CONFIG = {
    "bits": 4,
    "group_size": GROUP,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": None,
    "quant_method": "gptq",
}


def write_gptq_32k(out: str, model, act_order=False, in_config_json=False) -> dict:
    """The BlueLM-7B-Chat-32K-GPTQ layout; returns the reference state dict."""
    os.makedirs(out)
    qc = dict(AUTOGPTQ_QUANTIZE_CONFIG, desc_act=act_order)
    config = QuantConfig(bits=4, group_size=GROUP, sym=True)
    state, reference = quantized_state(model, config, torch.float16, with_g_idx=True, with_bias=True,
                                       act_order=act_order)
    weight_map, total = {}, 0
    for i, part in enumerate(three_shards(list(state)), 1):
        fname = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: state[k].contiguous() for k in part}, os.path.join(out, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
        total += sum(state[k].numel() * state[k].element_size() for k in part)
    with open(os.path.join(out, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(out, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump(qc, f, indent=2)
    extra = {"quantization_config": qc} if in_config_json else {}
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(published_config(model, rope_scaling=NTKMIXED, vocab_size=GPTQ_ROWS, **extra), f, indent=2)
    write_published_tokenizer(out, CHAT_32K)
    return reference


def reference_model(model_dir: str, reference: dict) -> BlueLMForCausalLM:
    """The same model in full precision: the published config.json, the dequantized weights."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    for key in ("auto_map", "architectures", "torch_dtype", "transformers_version", "quantization_config"):
        config.pop(key, None)
    config["vocab_size"] = reference["model.embed_tokens.weight"].shape[0]
    ref = BlueLMForCausalLM(BlueLMConfig(**config)).eval()
    ref.load_state_dict(reference)
    return ref


def sample_ids(vocab: int, chat_tokens) -> torch.Tensor:
    ids = torch.randint(4, SP_VOCAB, (2, 12), generator=torch.Generator().manual_seed(5))
    ids[:, 0] = 1
    ids[:, 1:1 + len(chat_tokens)] = torch.arange(SP_VOCAB, SP_VOCAB + len(chat_tokens))
    assert int(ids.max()) < vocab
    return ids


def logits(model, ids):
    with torch.no_grad():
        return model(ids, use_cache=False).logits.float()


# --- BlueLM-7B-Chat-4bits (legacy) --------------------------------------------------------


@pytest.mark.parametrize("group_size, bit_key", [(GROUP, {"quantization_bit": 4}), (-1, {})],
                         ids=["group32-quantization_bit", "per-channel-no-key"])
def test_legacy_4bits_loads_like_its_dequantized_model(tmp_path, caplog, group_size, bit_key):
    out = str(tmp_path / "BlueLM-7B-Chat-4bits")
    model = tiny_model(seed=1, vocab_size=LEGACY_ROWS)
    reference = write_legacy_4bits(out, model, group_size, bit_key)
    assert sorted(f for f in os.listdir(out) if "pytorch_model" in f) == [
        "pytorch_model-00001-of-00003.bin", "pytorch_model-00002-of-00003.bin",
        "pytorch_model-00003-of-00003.bin", "pytorch_model.bin.index.json"]
    assert is_quantized_dir(out)  # no quantize_config.json, no quantization_config: found by its tensors

    with caplog.at_level(logging.WARNING):
        loaded = load_quantized(out, dtype=torch.float32)
    assert f"vocab_size={CONFIG_VOCAB}" in caplog.text and str(LEGACY_ROWS) in caplog.text
    assert type(loaded) is BlueLMForCausalLM and loaded.config.vocab_size == LEGACY_ROWS
    assert loaded.config.use_stable_embedding and loaded.model.embed_layer_norm.bias is not None
    for layer in (loaded.model.layers[0].self_attn.q_proj, loaded.model.layers[1].mlp.down_proj):
        assert isinstance(layer, QuantLinear) and layer.group_size == group_size and layer.bias is None
        assert torch.equal(layer.g_idx.long(), torch.arange(layer.in_features) // (
            layer.in_features if group_size == -1 else group_size))
    assert not isinstance(loaded.lm_head, QuantLinear)

    ids = sample_ids(LEGACY_ROWS, CHAT_2K)
    expected = logits(reference_model(out, reference), ids)
    torch.testing.assert_close(logits(loaded, ids), expected, atol=1e-4, rtol=1e-4)

    # Default compute dtype: the config's torch_dtype (bfloat16), fp32 scales cast down.
    bf16 = load_quantized(out)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    assert bf16.model.layers[0].mlp.up_proj.scales.dtype == torch.bfloat16
    got = logits(bf16, ids)
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_legacy_4bits_with_its_tokenizer(tmp_path, caplog):
    out = str(tmp_path / "BlueLM-7B-Chat-4bits")
    write_legacy_4bits(out, tiny_model(seed=1, vocab_size=LEGACY_ROWS))
    with caplog.at_level(logging.WARNING, logger="bluelm_quant.hf"):
        model, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    # 704 rows for 702 tokens is alignment padding: nothing to say about the tokenizer.
    assert not [r for r in caplog.records if r.name == "bluelm_quant.hf"]
    assert isinstance(model.model.layers[0].self_attn.o_proj, QuantLinear)
    assert len(tok) == SP_VOCAB + 2 and (tok.human_token_id, tok.ai_token_id) == (SP_VOCAB, SP_VOCAB + 1)
    assert tok.encode("[|Human|]:hi[|AI|]:")[:2] == [1, SP_VOCAB]


def test_legacy_shapes_fitting_no_group_size(tmp_path):
    out = str(tmp_path / "BlueLM-7B-Chat-4bits")
    write_legacy_4bits(out, tiny_model(seed=1, vocab_size=LEGACY_ROWS))
    with open(os.path.join(out, "pytorch_model.bin.index.json"), encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
    key = "model.layers.0.mlp.down_proj.scales"  # in_features 128: 3 groups fit no group size
    shard = os.path.join(out, weight_map[key])
    state = torch.load(shard, weights_only=True)
    n = state[key].shape[1]
    state[key] = torch.ones(3, n)
    state[key.replace("scales", "qzeros")] = torch.zeros(3, n // 8, dtype=torch.int32)
    torch.save(state, shard)
    with pytest.raises(CheckpointError, match=r"down_proj\.scales has 3 rows.*fits no group size.*in_features=128"):
        load_quantized(out)


# --- BlueLM-7B-Chat-32K-GPTQ --------------------------------------------------------------


@pytest.mark.parametrize("act_order", [False, True], ids=["in-order", "act-order"])
def test_gptq_32k_loads_like_its_dequantized_model(tmp_path, act_order):
    out = str(tmp_path / "BlueLM-7B-Chat-32K-GPTQ")
    model = tiny_model(seed=2, vocab_size=GPTQ_ROWS, rope_scaling=NTKMIXED)
    reference = write_gptq_32k(out, model, act_order=act_order)
    assert sorted(f for f in os.listdir(out) if f.startswith("model")) == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json"]

    loaded = load_quantized(out, dtype=torch.float32)
    assert loaded.config.rope_type == "ntkmixed" and loaded.config.context_length == 32768
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, model.model.rotary_emb.inv_freq)
    assert loaded.quant_config.group_size == GROUP and loaded.quant_config.desc_act is act_order
    assert loaded.quant_config.extra["model_file_base_name"] is None  # unknown keys kept
    layer = loaded.model.layers[1].self_attn.v_proj
    assert isinstance(layer, QuantLinear) and layer.bias is not None and not layer.bias.any()
    ref = reference_model(out, reference)
    assert ref.config.rope_type == "ntkmixed"
    torch.testing.assert_close(layer.g_idx, model_g_idx(out, "model.layers.1.self_attn.v_proj"))

    ids = sample_ids(GPTQ_ROWS, CHAT_32K)
    torch.testing.assert_close(logits(loaded, ids), logits(ref, ids), atol=1e-4, rtol=1e-4)
    # ntkmixed is really in use: its frequencies are not plain RoPE's.
    plain = default_inv_freq(10000.0, loaded.config.head_dim)
    assert not torch.allclose(loaded.model.rotary_emb.inv_freq, plain)


def model_g_idx(out: str, module: str) -> torch.Tensor:
    from safetensors import safe_open

    with open(os.path.join(out, "model.safetensors.index.json"), encoding="utf-8") as f:
        fname = json.load(f)["weight_map"][f"{module}.g_idx"]
    with safe_open(os.path.join(out, fname), "pt") as f:
        return f.get_tensor(f"{module}.g_idx")


def test_gptq_32k_tokenizer_has_the_extra_special_tokens(tmp_path):
    out = str(tmp_path / "BlueLM-7B-Chat-32K-GPTQ")
    write_gptq_32k(out, tiny_model(seed=2, vocab_size=GPTQ_ROWS, rope_scaling=NTKMIXED))
    model, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    assert model.config.context_length == 32768
    assert len(tok) == SP_VOCAB + 4
    assert [tok.convert_tokens_to_ids(t) for t in CHAT_32K] == list(range(SP_VOCAB, SP_VOCAB + 4))
    assert tok.encode("[SEH]x[SEA]", add_special_tokens=False)[0] == SP_VOCAB + 2
    assert tok.decode([1, SP_VOCAB + 2, SP_VOCAB + 3, 2], skip_special_tokens=True) == ""


# --- bad input -----------------------------------------------------------------------------


def test_embedding_rows_disagreeing_with_the_tokenizer_warn_and_say_which(tmp_path, caplog):
    out = str(tmp_path / "BlueLM-7B-Chat-4bits")
    write_legacy_4bits(out, tiny_model(seed=1, vocab_size=LEGACY_ROWS))
    # A tokenizer from elsewhere: two more added tokens than the checkpoint has rows for.
    with open(os.path.join(out, "added_tokens.json"), encoding="utf-8") as f:
        added = json.load(f)
    added.update({f"<extra_{i}>": SP_VOCAB + 2 + i for i in range(4)})
    with open(os.path.join(out, "added_tokens.json"), "w", encoding="utf-8") as f:
        json.dump(added, f)
    with caplog.at_level(logging.WARNING, logger="bluelm_quant.hf"):
        _, tok = load_model_and_tokenizer(out, dtype=torch.float32)
    assert len(tok) == 706
    message = caplog.text
    assert "704" in message and "706" in message  # both numbers...
    assert "<extra_2>" in message and "<extra_3>" in message and "<extra_1>" not in message  # ...and which tokens


def test_rows_far_beyond_the_tokenizer_warn(tmp_path):
    class Tok:  # a tokenizer of 702 tokens, 700 of them SentencePiece
        vocab_size = SP_VOCAB

        def __len__(self):
            return SP_VOCAB + 2

        def convert_ids_to_tokens(self, i):
            return CHAT_2K[i - SP_VOCAB]

    assert tokenizer_vocab_mismatch(704, Tok()) is None
    assert tokenizer_vocab_mismatch(768, Tok()) is None  # padded to a multiple of 128
    message = tokenizer_vocab_mismatch(1024, Tok())
    assert "1024" in message and "702" in message and "no token" in message
    message = tokenizer_vocab_mismatch(650, Tok())
    assert "650" in message and "base vocabulary" in message and "700" in message


def test_missing_tokenizer_model_is_named(tmp_path):
    out = str(tmp_path / "BlueLM-7B-Chat-4bits")
    write_legacy_4bits(out, tiny_model(seed=1, vocab_size=LEGACY_ROWS))
    os.remove(os.path.join(out, "tokenizer.model"))
    with pytest.raises(BlueLMTokenizerError, match="tokenizer.model"):
        load_model_and_tokenizer(out, dtype=torch.float32)


def test_full_precision_dir_is_not_quantized(tmp_path):
    model = tiny_model(seed=1)
    model.save_pretrained(str(tmp_path / "fp"))
    assert not is_quantized_dir(str(tmp_path / "fp"))
    assert not is_quantized_dir(str(tmp_path / "nothing-here"))


# --- AutoModelForCausalLM.from_pretrained ----------------------------------------------------


@pytest.fixture(scope="module")
def published_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    legacy = str(root / "BlueLM-7B-Chat-4bits")
    gptq = str(root / "BlueLM-7B-Chat-32K-GPTQ")
    gptq_cfg = str(root / "BlueLM-7B-Chat-32K-GPTQ-config-json")
    return {
        "legacy": (legacy, write_legacy_4bits(legacy, tiny_model(seed=1, vocab_size=LEGACY_ROWS), bit_key={"quantization_bit": 4})),
        "gptq": (gptq, write_gptq_32k(gptq, tiny_model(seed=2, vocab_size=GPTQ_ROWS, rope_scaling=NTKMIXED), act_order=True)),
        "gptq-config-json": (gptq_cfg, write_gptq_32k(gptq_cfg, tiny_model(seed=2, vocab_size=GPTQ_ROWS, rope_scaling=NTKMIXED),
                                                      in_config_json=True)),
    }


@pytest.mark.parametrize("which", ["legacy", "gptq", "gptq-config-json"])
def test_automodel_from_pretrained_with_hf_enabled(published_dirs, which):
    out, reference = published_dirs[which]
    chat_tokens = CHAT_2K if which == "legacy" else CHAT_32K
    assert not hf.is_enabled()
    with hf.enabled():
        assert hf.is_enabled()
        model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert not hf.is_enabled()  # the with-block gave transformers its GPTQ quantizer back
    assert type(model) is BlueLMForCausalLM and model.is_quantized
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 7 * model.config.num_hidden_layers and not isinstance(model.lm_head, QuantLinear)
    assert model.model.layers[0].mlp.up_proj.scales.dtype == torch.float32
    ids = sample_ids(model.config.vocab_size, chat_tokens)
    expected = logits(reference_model(out, reference), ids)
    torch.testing.assert_close(logits(model, ids), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(model, ids), logits(load_quantized(out, dtype=torch.float32), ids),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("which, layout", [("legacy", "legacy BlueLM-7B-Chat-4bits"),
                                           ("gptq", "AutoGPTQ quantize_config.json")])
def test_automodel_refuses_4bit_dirs_it_would_load_as_random_weights(published_dirs, which, layout):
    out, _ = published_dirs[which]
    with pytest.raises(CheckpointError, match=f"{layout}.*load_quantized.*enable"):
        AutoModelForCausalLM.from_pretrained(out)


def test_hf_enable_is_opt_in_and_reversible(published_dirs):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING
    from transformers.quantizers.quantizer_gptq import GptqHfQuantizer

    assert AUTO_QUANTIZER_MAPPING["gptq"] is GptqHfQuantizer  # importing bluelm_quant changed nothing
    hf.enable()
    hf.enable()  # idempotent
    try:
        assert AUTO_QUANTIZER_MAPPING["gptq"] is hf.BlueLMQuantHfQuantizer
    finally:
        hf.disable()
    assert AUTO_QUANTIZER_MAPPING["gptq"] is GptqHfQuantizer
    # transformers' own path again: it needs optimum, which this environment does not have.
    out, _ = published_dirs["gptq-config-json"]
    with pytest.raises(ImportError, match="optimum"):
        AutoModelForCausalLM.from_pretrained(out)
