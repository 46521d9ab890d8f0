#!/usr/bin/env python
"""Peak memory and time of quantizing a synthetic 7B-shaped LLaMA on the CPU.

Writes a random LLaMA checkpoint with LLaMA-7B shapes (32 layers, hidden 4096, FFN 11008,
vocab 32000, bf16, one safetensors shard per decoder layer: ~13 GB; never commit it), then
quantizes it in a child process with a tiny random calibration set and reports the child's
peak RSS and the time per layer. The pipeline streams one decoder layer at a time, so the
peak should stay far below the checkpoint size.

    python tools/bench_quantize_memory.py --dir /tmp/llama7b-synth            # full size
    python tools/bench_quantize_memory.py --dir /tmp/llama-small --layers 2   # a quick look
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


def write_checkpoint(path: str, layers: int, hidden: int, ffn: int, vocab: int, heads: int) -> float:
    """Random bf16 LLaMA, one shard per decoder layer; returns its size in GB."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    from bluelm_quant.atomic import atomic_directory, write_json

    def linear(out_f, in_f):  # std 0.5/sqrt(in): each Linear keeps its input's scale
        return (torch.randn(out_f, in_f) * (0.5 / in_f**0.5)).to(torch.bfloat16)

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False,
                         torch_dtype="bfloat16")
    norm = lambda: torch.ones(hidden, dtype=torch.bfloat16)  # noqa: E731
    weight_map, total = {}, 0
    with atomic_directory(path) as tmp:
        # One file per part, written as it is made: the generator holds one layer at a time.
        total += _save(tmp, "embed", {"model.embed_tokens.weight": (torch.randn(vocab, hidden) * 0.02).to(torch.bfloat16)}, weight_map, save_file)
        for i in range(layers):
            p = f"model.layers.{i}."
            shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden), "self_attn.v_proj": (hidden, hidden),
                      "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden),
                      "mlp.down_proj": (hidden, ffn)}
            tensors = {f"{p}{name}.weight": linear(*shape) for name, shape in shapes.items()}
            tensors.update({p + "input_layernorm.weight": norm(), p + "post_attention_layernorm.weight": norm()})
            total += _save(tmp, f"layer{i:02d}", tensors, weight_map, save_file)
        total += _save(tmp, "head", {"model.norm.weight": norm(), "lm_head.weight": linear(vocab, hidden)}, weight_map, save_file)
        write_json(os.path.join(tmp, "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})
        config.save_pretrained(tmp)
    return total / 1e9


def _save(directory, name, tensors, weight_map, save_file) -> int:
    fname = f"model-{name}.safetensors"
    save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
    weight_map.update({k: fname for k in tensors})
    return sum(t.numel() * t.element_size() for t in tensors.values())


CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from bluelm_quant.config import QuantConfig
from bluelm_quant.pipeline import RunOptions, quantize_model
windows = torch.randint(0, {vocab}, ({nsamples}, {seqlen}), generator=torch.Generator().manual_seed(0))
quantize_model({src!r}, {out!r}, QuantConfig(bits=4, group_size=128, desc_act=True), windows,
               RunOptions(overwrite=True, progress=False))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the synthetic checkpoint lives (created if missing); outside the repo")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=4, help="calibration windows (random tokens)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    src = os.path.abspath(args.dir)
    if not os.path.exists(os.path.join(src, "config.json")):
        start = time.perf_counter()
        gb = write_checkpoint(src, args.layers, args.hidden, args.intermediate, args.vocab, args.heads)
        print(f"wrote {gb:.2f} GB synthetic LLaMA to {src} in {time.perf_counter() - start:.0f} s", flush=True)
    src_gb = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)) / 1e9
    out = src.rstrip("/") + "-gptq"
    code = CHILD.format(root=os.path.abspath(ROOT), vocab=args.vocab, nsamples=args.nsamples, seqlen=args.seqlen, src=src, out=out)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux: KiB
    with open(os.path.join(out, "quantize_report.json"), encoding="utf-8") as f:
        layers = json.load(f)["layers"]
    out_gb = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out)) / 1e9
    per_layer = [s["seconds"] for s in layers]
    result = {
        "layers": len(layers), "source_gb": round(src_gb, 2), "quantized_gb": round(out_gb, 2),
        "peak_rss_gb": round(peak_gb, 2), "total_seconds": round(seconds, 1),
        "seconds_per_layer_mean": round(sum(per_layer) / len(per_layer), 1), "seconds_per_layer_max": round(max(per_layer), 1),
        "calibration": f"{args.nsamples} x {args.seqlen} tokens",
    }
    print(f"\n{'layers':>7}{'source GB':>11}{'4-bit GB':>10}{'peak RSS GB':>13}{'total s':>9}{'s/layer':>9}")
    print(f"{result['layers']:>7}{result['source_gb']:>11.2f}{result['quantized_gb']:>10.2f}{result['peak_rss_gb']:>13.2f}"
          f"{result['total_seconds']:>9.0f}{result['seconds_per_layer_mean']:>9.1f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
