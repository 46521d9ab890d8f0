"""Tiny random models shared by the tests (built in memory, no downloads)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(tie: bool = False, seed: int = 0, dtype=torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=tie,
    )
    cfg.update(overrides)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    # Default init is tiny (std 0.02); wider weights make quantization error visible.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)
    return model.eval()


def tokens(batch: int = 2, seq: int = 16, vocab: int = 128, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def byte_symbols():
    """The ByteLevel pre-tokenizer's printable stand-in for each byte value 0..255."""
    kept = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = iter(range(256, 512))
    return [chr(b) if b in kept else chr(next(shifted)) for b in range(256)]


def byte_tokenizer():
    """One token per UTF-8 byte, token id = byte value, plus <s> = 256 and </s> = 257."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: b for b, c in enumerate(byte_symbols())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def save_tiny_llama_dir(path: str, **overrides) -> str:
    """A tiny LLaMA + byte tokenizer saved as a Hugging Face directory (sharded)."""
    overrides.setdefault("vocab_size", 258)
    tiny_llama(**overrides).save_pretrained(path, max_shard_size="100KB")
    byte_tokenizer().save_pretrained(path)
    return path


def save_tiny_4bit(path: str, seed: int, group_size: int = 32, sym: bool = False) -> str:
    """A tiny_llama(seed) quantized with round-to-nearest (4 bits) and saved as a checkpoint at `path`."""
    from bluelm_quant.config import QuantConfig
    from bluelm_quant.nn import replace_linear
    from bluelm_quant.saving import save_quantized

    model = tiny_llama(seed=seed)
    config = QuantConfig(bits=4, group_size=group_size, sym=sym)
    replace_linear(model, config, quantize=True)
    save_quantized(model.requires_grad_(False), path, config)
    return path
