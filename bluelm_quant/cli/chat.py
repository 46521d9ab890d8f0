"""Multi-turn chat in the terminal with a BlueLM (or chat-templated LLaMA-like) model.

    bluelm-chat --model DIR [--device cuda] [--dtype bfloat16] [--do-sample] ...

DIR is a full-precision Hugging Face directory, or a 4-bit one written by bluelm-quant / GPTQ
tools (quantize_config.json or config.json's quantization_config), or the legacy
BlueLM-7B-Chat-4bits layout (detected by its *.qweight tensors). Commands at the prompt:
/reset clears the conversation, /exit (or end of input) quits. Replies stream token by
token; notices (dropped turns, errors) go to stderr.
"""
from __future__ import annotations

import argparse
import sys

from . import add_debug_flag, configure_logging, fraction, nonnegative_int, positive_float, positive_int, run_tool

DTYPES = ("float32", "float16", "bfloat16")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bluelm-chat", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory (full precision or 4-bit)")
    p.add_argument("--adapter", help="a LoRA adapter directory trained on --model (bluelm-finetune's output; needs peft)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (default: the checkpoint's)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512, help="longest reply in tokens (default 512, BlueLM's demo)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding (default: greedy)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="sampling temperature, with --do-sample (default 1.0)")
    p.add_argument("--top-p", type=fraction, default=0.8, help="nucleus sampling mass in (0, 1], with --do-sample (default 0.8)")
    p.add_argument("--top-k", type=nonnegative_int, default=50,
                   help="sample among the k likeliest tokens, with --do-sample; 0 = no limit (default 50)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.1,
                   help="divide the scores of tokens already in the conversation by this (default 1.1; 1 = off)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for the 4-bit kernels (default: torch's count; torch's own ops run on one "
                        "thread while a 4-bit model generates on the CPU)")
    p.add_argument("--lm-head-bits", type=int, choices=(16, 8, 4), default=16,
                   help="4-bit checkpoints: quantize the lm_head at load, 8 (int8, ~0.3%% perplexity) or 4 (~12%%); "
                        "faster on the CPU (default 16: as stored)")
    p.add_argument("--fast", action="store_true",
                   help="static KV cache + torch.compile'd decode step (the first reply compiles: a minute or more)")
    p.add_argument("--verbose", action="store_true", help="report prompt token counts on stderr")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.lm_head_bits != 16:
        from ..hf import is_quantized_dir

        if not is_quantized_dir(args.model):
            p.error(f"--lm-head-bits {args.lm_head_bits}: {args.model} is not a 4-bit checkpoint (a quantized lm_head "
                    "comes with one only)")
    return run_tool(chat_command, args)


def check_threads(threads: int | None) -> int | None:
    """--threads (positive, checked by argparse): more than the CPUs this process may use runs that many, with a notice."""
    import os

    if threads is None:
        return None
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if threads > cpus:
        print(f"[notice] --threads {threads} but this process may run on {cpus} CPUs: using {cpus}",
              file=sys.stderr, flush=True)
        return cpus
    return threads


def load_chat_model(args: argparse.Namespace, device: str):
    """(model, tokenizer) as the chat runs them: with the adapter when one is given, else, on the CPU,
    with the projections that share an input fused into one kernel call each and each decoder layer's
    decode step as two extension calls (cpu_decode.prepare_cpu_decode; adapters need the separate
    Linears, and a chat never saves the model). Not on CUDA: never measured there, and a long prompt
    would dequantize the fused weight, twice a member's size, in one piece.

    A model to be fused is loaded with its kernel tensors where loading puts them: fusing packs
    them into a huge-page arena (huge_pages.py), and packing at load time as well would hold two
    arenas while fusing, the kernel tensors' size more at the peak (~4 GB for BlueLM-7B; SmolLM2
    g64, int8 head: peak RSS while fusing 724 -> 669 MB, median of 5 runs each)."""
    import contextlib

    import torch

    from .. import huge_pages
    from ..cpu_decode import prepare_cpu_decode
    from ..hf import load_model_and_tokenizer
    from ..placement import resolve_device

    fuse = not args.adapter and resolve_device(device).type == "cpu"
    with huge_pages.disabled() if fuse else contextlib.nullcontext():
        model, tokenizer = load_model_and_tokenizer(args.model, device=device, lm_head_bits=args.lm_head_bits,
                                                    dtype=getattr(torch, args.dtype) if args.dtype else None)
    if args.adapter:
        from ..lora import load_adapter

        return load_adapter(model, args.adapter), tokenizer
    if fuse and not prepare_cpu_decode(model)[0]:
        huge_pages.pack_kernel_tensors(model)  # nothing fused (a family without a spec), so nothing packed yet
    return model, tokenizer


def chat_command(args: argparse.Namespace) -> int:
    import torch

    from ..chat import ChatError, encode_prompt, stream_chat

    configure_logging()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = check_threads(args.threads)
    model, tokenizer = load_chat_model(args, device)
    generation = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, repetition_penalty=args.repetition_penalty,
                      threads=threads, fast=args.fast)
    if args.do_sample:
        generation.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)

    def notice(text: str) -> None:
        print(f"[notice] {text}", file=sys.stderr, flush=True)

    history: list[tuple[str, str]] = []
    print("Type a message; /reset clears the conversation, /exit quits.", file=sys.stderr, flush=True)
    while True:
        try:
            query = input("User: ")
        except EOFError:
            print()
            return 0
        command = query.strip()
        if command == "/exit":
            return 0
        if command == "/reset":
            history = []
            print("[history cleared]", flush=True)
            continue
        if not command:
            continue
        if args.verbose:
            tokens = len(encode_prompt(model, tokenizer, query, history))
            print(f"[prompt: {tokens} tokens, {len(history)} past turns]", file=sys.stderr, flush=True)
        print("AI: ", end="", flush=True)
        shown = ""
        try:
            for reply, new_history in stream_chat(model, tokenizer, query, history, on_notice=notice, **generation):
                # Each reply normally extends the previous one; if decoding rewrote it, start over.
                print(reply[len(shown):] if reply.startswith(shown) else "\n" + reply, end="", flush=True)
                shown, history = reply, new_history
        except ChatError as exc:
            print(f"\n[error] {exc}", file=sys.stderr, flush=True)
        print(flush=True)


if __name__ == "__main__":
    sys.exit(main())
