"""Chat on a tiny random BlueLM: the multi-turn bug class of docs/BLUELM.md section 5, stop tokens,
context trimming, streaming, the chat-template path, and tools/chat.py through stdin."""
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, LogitsProcessor

from bluelm_fixtures import SP_VOCAB, make_tiny_bluelm_dir, reference_greedy
from bluelm_quant.chat import ChatError, bluelm_prompt, chat, encode_prompt, prepare_prompt, stream_chat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUMAN_ID, AI_ID = SP_VOCAB, SP_VOCAB + 1  # where the fixture's tokenizer_config.json puts them
GREEDY = dict(do_sample=False, max_new_tokens=8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_bluelm_dir(str(tmp_path_factory.mktemp("bluelm")))


@pytest.fixture(scope="module")
def model_and_tokenizer(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_second_turn_prompt_is_the_documented_format(model_and_tokenizer):
    model, tok = model_and_tokenizer
    history = [("你好", "Hello, how can I help?")]
    ids = encode_prompt(model, tok, "What is 12 + 5?", history)
    text = "[|Human|]:你好[|AI|]:Hello, how can I help?</s>[|Human|]:What is 12 + 5?[|AI|]:"
    assert bluelm_prompt("What is 12 + 5?", history) == text
    assert ids == tok.encode(text)
    assert ids[:2] == [1, HUMAN_ID] and ids[-1] == AI_ID
    assert ids.count(HUMAN_ID) == 2 and ids.count(AI_ID) == 2 and ids.count(2) == 1


def test_second_turn_equals_fresh_greedy_decode(model_and_tokenizer):
    """The docs/BLUELM.md section 5 bug class: turn 2 must not depend on anything left over from turn 1
    (KV cache, positions, attention mask) - only on the re-encoded conversation."""
    model, tok = model_and_tokenizer
    reply1, history = chat(model, tok, "Tell me about the river.", **GREEDY)
    assert history == [("Tell me about the river.", reply1)]
    reply2, history2 = chat(model, tok, "And the library?", history, **GREEDY)
    assert history2 == [("Tell me about the river.", reply1), ("And the library?", reply2)]

    prompt2 = tok.encode(f"[|Human|]:Tell me about the river.[|AI|]:{reply1}</s>[|Human|]:And the library?[|AI|]:")
    expected = reference_greedy(model, prompt2, {2, HUMAN_ID}, 8, repetition_penalty=1.1)
    assert reply2 == tok.decode(expected, skip_special_tokens=True).strip()
    assert reply2  # a non-empty reply, so the comparison above means something
    # Same answer when turn 2 is the very first thing this model instance does.
    fresh = AutoModelForCausalLM.from_pretrained(model.name_or_path).eval()
    assert chat(fresh, tok, "And the library?", history, **GREEDY)[0] == reply2


class ForceToken(LogitsProcessor):
    """Make the model emit `token` as its `step`-th new token."""

    def __init__(self, prompt_len, step, token):
        self.at, self.token = prompt_len + step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] == self.at:
            scores = torch.full_like(scores, -float("inf"))
            scores[:, self.token] = 0
        return scores


@pytest.mark.parametrize("stop", [2, HUMAN_ID])
def test_reply_ends_at_stop_token(model_and_tokenizer, stop):
    model, tok = model_and_tokenizer
    n = len(encode_prompt(model, tok, "hi"))
    free, _ = chat(model, tok, "hi", max_new_tokens=3)
    forced = [ForceToken(n, 3, stop)]
    reply, history = chat(model, tok, "hi", max_new_tokens=20, logits_processor=forced)
    assert reply == free and history == [("hi", free)]  # stopped right there, marker not in text
    empty, _ = chat(model, tok, "hi", logits_processor=[ForceToken(n, 0, stop)])
    assert empty == ""


def test_stream_matches_chat(model_and_tokenizer):
    model, tok = model_and_tokenizer
    history = [("你好", "Hello")]
    expected = chat(model, tok, "Write a poem about the moon.", history, max_new_tokens=12)
    items = list(stream_chat(model, tok, "Write a poem about the moon.", history, max_new_tokens=12))
    assert items[-1] == expected
    for before, after in zip(items, items[1:]):
        assert after[0].startswith(before[0])
    n = len(encode_prompt(model, tok, "hi"))
    assert list(stream_chat(model, tok, "hi", logits_processor=[ForceToken(n, 0, 2)])) == [("", [("hi", "")])]


def test_oldest_turns_are_trimmed_with_a_notice(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, max_position_embeddings=64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    history = [(f"question number {i} about the weather", f"answer {i}: it is clear") for i in range(4)]
    prompt = prepare_prompt(model, tok, "and tomorrow?", history, max_new_tokens=8)
    assert 0 < prompt.dropped_turns < 4
    assert prompt.history == history[prompt.dropped_turns:]
    assert len(prompt.input_ids) + 8 <= 64
    assert len(encode_prompt(model, tok, "and tomorrow?", history[prompt.dropped_turns - 1:])) + 8 > 64
    notices = []
    reply, new_history = chat(model, tok, "and tomorrow?", history, on_notice=notices.append, **GREEDY)
    assert new_history == history[prompt.dropped_turns:] + [("and tomorrow?", reply)]
    assert len(notices) == 1 and f"dropped the {prompt.dropped_turns} oldest turn" in notices[0]


def test_max_new_tokens_shortened_then_too_long_prompt_errors(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir, max_position_embeddings=64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    query = "the river behind the old library " * 2
    n = len(encode_prompt(model, tok, query))
    assert n < 64
    prompt = prepare_prompt(model, tok, query, [], max_new_tokens=512)
    assert prompt.max_new_tokens == 64 - n and "max_new_tokens shortened" in prompt.notice
    with pytest.raises(ChatError, match="nothing is left to drop"):
        chat(model, tok, "the river behind the old library " * 20, [("a", "b")], **GREEDY)


def test_chat_template_path_for_other_models(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    config = LlamaConfig(vocab_size=SP_VOCAB + 4, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=256)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(config).eval()
    with pytest.raises(ChatError, match="no chat_template"):
        chat(llama, tok, "hi", **GREEDY)
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>"
                         "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    history = [("hi", "hello")]
    ids = encode_prompt(llama, tok, "how are you?", history)
    assert ids == tok.encode("<user>hi</s><assistant>hello</s><user>how are you?</s><assistant>",
                             add_special_tokens=True)
    reply, new_history = chat(llama, tok, "how are you?", history, **GREEDY)
    expected = reference_greedy(llama, ids, {2}, 8, repetition_penalty=1.1)
    assert reply == tok.decode(expected, skip_special_tokens=True).strip()
    assert new_history == history + [("how are you?", reply)]


def test_tool_reset_through_stdin(model_dir):
    script = os.path.join(REPO, "tools", "chat.py")
    stdin = "Tell me about the river.\nAnd the library?\n/reset\nTell me about the river.\n/exit\n"
    run = subprocess.run(
        [sys.executable, script, "--model", model_dir, "--device", "cpu", "--max-new-tokens", "6", "--verbose"],
        input=stdin, capture_output=True, text=True, timeout=120, cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )
    assert run.returncode == 0, run.stderr
    counts = [line for line in run.stderr.splitlines() if line.startswith("[prompt:")]
    assert len(counts) == 3
    assert counts[0] == counts[2] and counts[0].endswith("0 past turns]")  # /reset emptied the history
    assert counts[1].endswith("1 past turns]")
    assert "[history cleared]" in run.stdout
    replies = [part.split("\n")[0] for part in run.stdout.split("AI: ")[1:]]
    assert len(replies) == 3 and replies[0] == replies[2] and replies[0]
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)
    assert replies[0] == chat(model, tok, "Tell me about the river.", max_new_tokens=6)[0]
