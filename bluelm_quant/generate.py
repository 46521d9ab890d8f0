"""A minimal greedy generation loop for measuring speed: static KV cache, one prefill,
then one decode step per token, optionally compiled.

Why not `model.generate`: its per-step Python (logits processors, stopping criteria,
cache bookkeeping) is part of what a benchmark would measure, and it cannot be told to
compile only the decode step. This loop does the same greedy arithmetic (tested to give
the same tokens) with nothing else per step, so the kernels show.

The embedding lookup runs outside the (compiled) step: with `embed_on_cpu` it is a CPU
op, which a CUDA graph cannot capture.

On the CPU the loop runs torch's own ops on one thread and the 4-bit / int8 kernels on all of
them (`decode_threads`): at batch 1 torch's ops between the kernels take microseconds, and a
2-thread OpenMP region of theirs waits out a scheduler time slice whenever the machine is busy.
`fast_generate_config` puts `model.generate` (and so the chat path) on the same footing: a
static KV cache, the step compiled if asked.
"""
from __future__ import annotations

import contextlib
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import CompileConfig, StaticCache

from . import cpu_decode, ops
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


@contextmanager
def decode_threads(threads: int | None = None):
    """torch's own CPU ops on one thread and the quantized kernels on `threads` (default: the
    current torch.get_num_threads()) while the block runs; both restored after.

    Measured on the shared 2-core machine (load ~8, SmolLM2 4-bit, 128 tokens, eager): torch and
    kernels on 2 threads 2.9 tok/s, torch on 1 and kernels on 2 15.4 tok/s: one SDPA call on a
    160-token cache took 16 ms on 2 OpenMP threads and 30 us on one. What it costs on a quiet
    machine: torch's part of a batch-1 step (norms, RoPE, attention over the cache) runs on one
    core, and so does a full-precision lm_head (use lm_head_bits=8). torch.compile bakes the
    thread count into the code it generates: compile inside this block.
    """
    before = torch.get_num_threads()
    before_kernels = ops.kernel_threads_setting()
    kernels = threads or before
    has_kernels = ops.cpu_isa() is not None  # None: the extension is not built
    torch.set_num_threads(1)
    if has_kernels:
        ops.set_kernel_threads(kernels)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if has_kernels:
            ops.set_kernel_threads(before_kernels)


def model_decode_threads(model, threads: int | None = None):
    """decode_threads(threads) for a model on the CPU whose Linears run on the quantized kernels;
    nothing otherwise (a full-precision model's matmuls are torch's own: they keep every thread)."""
    from .nn import QuantLinear
    from .placement import Int8Linear

    quantized = any(isinstance(m, (QuantLinear, Int8Linear)) for m in model.modules())
    if model_device(model).type == "cpu" and quantized:
        return decode_threads(threads)
    return contextlib.nullcontext()


def _compile_mode(device: torch.device) -> str:
    return "reduce-overhead" if device.type == "cuda" else "default"  # CUDA graphs / plain inductor


def _compile_options(model, device: torch.device, mode: str | None) -> dict:
    """torch.compile's options for a Generator's decode step of `model` (a mode's options: torch
    takes a mode or options, not both)."""
    options = dict(torch._inductor.list_mode_options(mode or _compile_mode(device)))
    if device.type == "cpu" and cpu_decode.decode_layers_enabled(model):
        # The step's wrapper in C++ instead of Python: with the decode-layer ops a layer is three op
        # calls and one small kernel, and the Python wrapper calling them was ~2 ms of a ~12 ms SmolLM2
        # step. Measured side by side (SmolLM2 g64, int8 head, 2 threads, 7 rounds): 88.0 -> 97.9
        # tok/s, ahead in every round; the first compile 122 s instead of 11 (later runs hit
        # inductor's on-disk cache: 9 s). Not without the ops: that graph's C++ wrapper was still
        # compiling after 6 minutes.
        options["cpp_wrapper"] = True
    return options


def _compile_step_of_one_model(step, device: torch.device, mode: str | None):
    """torch.compile of a Generator's bound `step`, without guards on the model's modules.

    Dynamo checks every parameter and buffer of the model before each call: 3.3 ms of a 41 ms
    SmolLM2 step (loaded machine; 0.6 ms without them). A Generator's step only ever runs its
    one model, so those guards are dropped (the inputs' shapes and dtypes stay guarded). Dynamo
    keeps compiled code per code object, so the step gets a code object of its own: another
    Generator's model (another head module, dtype) never runs this one's compiled code.
    """
    fn = step.__func__
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{id(step.__self__):x}")
    own = types.MethodType(types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__),
                           step.__self__)
    options = _compile_options(step.__self__.model, device, mode)
    options["guard_filter_fn"] = torch.compiler.skip_guard_on_all_nn_modules_unsafe
    return torch.compile(own, dynamic=False, options=options)


class Generator:
    """Greedy decoding of fixed-size batches into a StaticCache of `max_len` positions.

    compile: wrap the decode step in torch.compile (mode "reduce-overhead" = CUDA graphs
    on CUDA; plain inductor on the CPU, with a C++ wrapper when the model's layers run the
    decode-layer ops: the first compile then takes ~2 minutes on 2 cores, later processes reuse
    inductor's on-disk cache). The prefill always runs eagerly: its shape changes
    with the prompt and compiling it would recompile per prompt length.
    threads (CPU): the kernels' thread count inside `model_decode_threads` (default: torch's
    count when generate() is called).
    """

    def __init__(self, model, max_len: int, compile: bool = False, compile_mode: str | None = None,
                 threads: int | None = None):
        self.model = model
        self.max_len = max_len
        self.device = model_device(model)
        self.threads = threads
        self.embed = model.get_input_embeddings()
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._used = False
        step = self._step
        if compile:
            step = _compile_step_of_one_model(self._step, self.device, compile_mode)
        self.decode_step = step

    def _step(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(
            inputs_embeds=embeds, position_ids=position_ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1].argmax(dim=-1)

    def generate(self, input_ids: torch.Tensor, new_tokens: int) -> GenerationStats:
        """Greedy: the prompt [batch, prompt_len] (any device) and `new_tokens` more, with timings."""
        with model_decode_threads(self.model, self.threads):
            return self._generate(input_ids, new_tokens)

    @torch.inference_mode()
    def _generate(self, input_ids: torch.Tensor, new_tokens: int) -> GenerationStats:
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


def fast_generate_config(model, compile: bool = False, max_cache_len: int | None = None) -> dict:
    """`model.generate` keywords for the fast loop: a static KV cache (allocated once per call, no
    per-step growth) and, with compile=True, the decode step compiled (on the CPU too, where
    transformers does not compile by default; the prefill stays eager).

    max_cache_len: cache positions to allocate at least (default: prompt + max_new_tokens of each
    call). A compiled step is specialised to the cache length, so a chat that calls generate with
    growing prompts should pass its context length here to compile once. Attention then reads
    every allocated position, so keep it no longer than the calls need.
    """
    kwargs = {"cache_implementation": "static"}
    if max_cache_len is not None:
        kwargs["max_cache_len"] = int(max_cache_len)
    if compile:
        # All guards kept: transformers compiles model.__call__, whose code object every model shares.
        # Not Generator's C++ wrapper (_compile_options): with it the chat's first reply waited 4.5 min
        # instead of 1.5 (SmolLM2, 2 cores, empty inductor cache), and a conversation that outgrows
        # its cache compiles again.
        config = CompileConfig(fullgraph=False, dynamic=False, mode=_compile_mode(model_device(model)))
        config._compile_all_devices = True  # transformers compiles on CUDA-like devices only unless told
        kwargs["compile_config"] = config
    else:
        kwargs["disable_compile"] = True
    return kwargs


__all__ = ["GenerationStats", "Generator", "decode_threads", "fast_generate_config", "model_decode_threads"]
