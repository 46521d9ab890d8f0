"""A minimal greedy generation loop for measuring speed: static KV cache, one prefill,
then one decode step per token, optionally compiled.

Why not `model.generate`: its per-step Python (logits processors, stopping criteria,
cache bookkeeping) is part of what a benchmark would measure, and it cannot be told to
compile only the decode step. This loop does the same greedy arithmetic (tested to give
the same tokens) with nothing else per step, so the kernels show.

The embedding lookup runs outside the (compiled) step: with `embed_on_cpu` it is a CPU
op, which a CUDA graph cannot capture.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import StaticCache

from .placement import model_device


@dataclass
class GenerationStats:
    tokens: torch.Tensor  # [batch, prompt + new], on the CPU
    prompt_len: int
    new_tokens: int
    prefill_s: float  # prompt forward + the first new token: time to first token
    decode_s: float  # the remaining new_tokens - 1 steps

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.batch * self.prompt_len / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1
        return self.batch * steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Generator:
    """Greedy decoding of fixed-size batches into a StaticCache of `max_len` positions.

    compile: wrap the decode step in torch.compile (mode "reduce-overhead" = CUDA graphs
    on CUDA; plain inductor on the CPU). The prefill always runs eagerly: its shape changes
    with the prompt and compiling it would recompile per prompt length.
    """

    def __init__(self, model, max_len: int, compile: bool = False, compile_mode: str | None = None):
        self.model = model
        self.max_len = max_len
        self.device = model_device(model)
        self.embed = model.get_input_embeddings()
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._used = False
        step = self._step
        if compile:
            mode = compile_mode or ("reduce-overhead" if self.device.type == "cuda" else "default")
            step = torch.compile(self._step, mode=mode, dynamic=False)
        self.decode_step = step

    def _step(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            inputs_embeds=embeds, position_ids=position_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1].argmax(dim=-1)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> GenerationStats:
        batch, prompt_len = input_ids.shape
        if prompt_len + new_tokens > self.max_len:
            raise ValueError(
                f"prompt of {prompt_len} tokens + {new_tokens} new ones exceeds the cache's max_len={self.max_len}"
            )
        if new_tokens < 1:
            raise ValueError(f"new_tokens={new_tokens} must be at least 1")
        if self._used:
            self.cache.reset()  # zeroes in place: the compiled step keeps its static addresses
        self._used = True
        ids = input_ids.to(self.device)
        positions = torch.arange(self.max_len, device=self.device).expand(batch, -1)
        out = [input_ids.cpu()]

        _sync(self.device)
        t0 = time.perf_counter()
        nxt = self._step(self.embed(ids), positions[:, :prompt_len])
        out.append(nxt.cpu()[:, None])  # the copy to the host waits for the device
        t1 = time.perf_counter()
        for i in range(new_tokens - 1):
            pos = positions[:, prompt_len + i : prompt_len + i + 1]
            # clone: a CUDA-graph step overwrites its output buffer on the next replay
            nxt = self.decode_step(self.embed(nxt[:, None]), pos).clone()
            out.append(nxt[:, None])
        tokens = torch.cat([t.cpu() for t in out], dim=1)
        _sync(self.device)
        t2 = time.perf_counter()
        return GenerationStats(tokens, prompt_len, new_tokens, t1 - t0, t2 - t1)


__all__ = ["GenerationStats", "Generator"]
