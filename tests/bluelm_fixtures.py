"""Tiny BlueLM directories built at test time: a SentencePiece model trained on
tests/data/bluelm_tokenizer_corpus.txt, tokenizer files laid out like the published ones,
and a random 2-layer model. No downloads, no real weights."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile

import sentencepiece as spm
import torch

import bluelm_quant  # noqa: F401  (registers BlueLM with the Auto classes)
from bluelm_quant.models.bluelm import BlueLMConfig, BlueLMForCausalLM

CORPUS = os.path.join(os.path.dirname(__file__), "data", "bluelm_tokenizer_corpus.txt")
SP_VOCAB = 700
CHAT_TOKENS = ("[|Human|]:", "[|AI|]:", "[SEH]", "[SEA]")
# What the published remote-code checkpoints carry; our loader must ignore it.
REMOTE_AUTO_MAP = {
    "AutoConfig": "configuration_bluelm.BlueLMConfig",
    "AutoModelForCausalLM": "modeling_bluelm.BlueLMForCausalLM",
}
_SP_MODEL: str | None = None


def trained_sp_model() -> str:
    """Path of a SentencePiece model trained once per test process (training takes seconds)."""
    global _SP_MODEL
    if _SP_MODEL is None or not os.path.isfile(_SP_MODEL):
        out_dir = tempfile.mkdtemp(prefix="bluelm_sp_")
        atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
        _SP_MODEL = train_sp_model(out_dir)
    return _SP_MODEL


def train_sp_model(out_dir: str) -> str:
    """SentencePiece BPE like BlueLM's: unk 0, <s> 1, </s> 2, pad 3, digits split, byte fallback."""
    os.makedirs(out_dir, exist_ok=True)
    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        input=CORPUS,
        model_prefix=prefix,
        model_type="bpe",
        vocab_size=SP_VOCAB,
        character_coverage=0.9995,
        normalization_rule_name="identity",  # keep full-width punctuation so text round-trips
        byte_fallback=True,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=1,
        minloglevel=2,
    )
    os.remove(prefix + ".vocab")
    return prefix + ".model"


def _token_entry(content: str, special: bool) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special}


def write_tokenizer_dir(out_dir: str, chat_ids_start: int, sp_model: str | None = None,
                        chat_tokens=CHAT_TOKENS, remote_auto_map: bool = True) -> str:
    """tokenizer.model + tokenizer_config.json whose added_tokens_decoder puts the chat tokens at
    chat_ids_start.. (100000 in the real files). sp_model defaults to the shared trained one."""
    os.makedirs(out_dir, exist_ok=True)
    sp_model = sp_model or trained_sp_model()
    shutil.copyfile(sp_model, os.path.join(out_dir, "tokenizer.model"))
    decoder = {str(i): _token_entry(t, True) for i, t in enumerate(("<unk>", "<s>", "</s>"))}
    for offset, token in enumerate(chat_tokens):
        decoder[str(chat_ids_start + offset)] = _token_entry(token, False)
    config = {
        "tokenizer_class": "BlueLMTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "added_tokens_decoder": decoder,
        "model_max_length": 2048,
    }
    if remote_auto_map:
        config["auto_map"] = {"AutoTokenizer": ["tokenization_bluelm.BlueLMTokenizer", None]}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return out_dir


def tiny_config(**overrides) -> BlueLMConfig:
    kwargs = dict(vocab_size=SP_VOCAB + len(CHAT_TOKENS), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    kwargs.update(overrides)
    return BlueLMConfig(**kwargs)


def tiny_model(seed: int = 0, **overrides) -> BlueLMForCausalLM:
    torch.manual_seed(seed)
    model = BlueLMForCausalLM(tiny_config(**overrides)).eval()
    # Non-trivial norms so the stable-embedding LayerNorm and RMSNorms are actually exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def add_remote_auto_map(model_dir: str) -> None:
    """Make config.json look like a published one: auto_map to remote code that is not there."""
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    config["auto_map"] = REMOTE_AUTO_MAP
    config["architectures"] = ["BlueLMForCausalLM"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def make_tiny_bluelm_dir(out_dir: str, sp_model: str | None = None, seed: int = 0, **overrides) -> str:
    """A complete chat-model directory: random tiny BlueLM + tokenizer with the chat tokens right
    after the SentencePiece vocabulary, so every id the model can emit decodes."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(out_dir)
    add_remote_auto_map(out_dir)
    write_tokenizer_dir(out_dir, chat_ids_start=SP_VOCAB, sp_model=sp_model)
    return out_dir


def reference_greedy(model, prompt_ids, stop_ids, max_new_tokens, repetition_penalty=1.1):
    """Greedy decoding written out by hand: a full forward pass over the whole sequence for every
    token (no KV cache at all), repetition penalty as in the CTRL paper."""
    ids = list(prompt_ids)
    new = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        seen = torch.tensor(sorted(set(ids)))
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / repetition_penalty, picked * repetition_penalty)
        token = int(logits.argmax())
        if token in stop_ids:
            break
        ids.append(token)
        new.append(token)
    return new
