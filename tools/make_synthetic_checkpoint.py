#!/usr/bin/env python
"""Write a synthetic checkpoint with a real 7B layout (for memory and speed tests).

Default: BlueLM-7B shapes (32 layers, hidden 4096, FFN 11008, 32 heads, vocab 100096),
4-bit GPTQ, group size 128, random codes, fp16 scales, sharded safetensors (2 GB shards)
+ index + quantize_config.json + config.json (model_type BlueLM): ~5.0 GB on disk.
--full writes the full-precision counterpart instead (~15 GB at 7B size, --dtype float16
or bfloat16); --arch llama a LLaMA (no stable-embedding LayerNorm; use --vocab 32000 for
LLaMA-7B). --layers, --hidden, --intermediate, --heads, --vocab shrink it for CI.

The weights are random but scaled so activations stay finite through every layer in
fp16 (each Linear roughly preserves the variance of its input). Tensors are generated in
checkpoint order and streamed through bluelm_quant's shard writer, which holds one shard
(at most --max-shard-size) at a time.

    python tools/make_synthetic_checkpoint.py --out /tmp/bluelm7b-synth-4bit
    python tools/make_synthetic_checkpoint.py --out /tmp/llama7b --arch llama --vocab 32000 --full --dtype bfloat16
"""
from __future__ import annotations

import argparse
import math
import os
import time

import torch

from bluelm_quant.atomic import atomic_directory, write_json
from bluelm_quant.config import QuantConfig
from bluelm_quant.packing import pack_qzeros
from bluelm_quant.saving import DEFAULT_MAX_SHARD, write_configs, write_shards

PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
# The projections of a layer that read the same input. With --act-order they share one g_idx, as
# GPTQ's desc_act gives them (the order comes from the Hessian of that input), so that the loaded
# model can fuse them (bluelm_quant.fuse) as it would a real checkpoint's.
SAME_INPUT = {"q_proj": "attention input", "k_proj": "attention input", "v_proj": "attention input",
              "gate_proj": "MLP input", "up_proj": "MLP input"}
# Target weight std = GAIN / sqrt(in_features): each Linear keeps its input's scale.
GAIN = 0.5
# Std of a uniform 4-bit code around the symmetric zero 8.
CODE_STD = math.sqrt((16**2 - 1) / 12)
REPO = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def model_config(args):
    shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                 num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                 max_position_embeddings=args.context, tie_word_embeddings=False, torch_dtype=args.dtype)
    if args.arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(architectures=["LlamaForCausalLM"], **shape)
    from bluelm_quant.models.bluelm import BlueLMConfig

    return BlueLMConfig(architectures=["BlueLMForCausalLM"], **shape)


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per projection name."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def quantized_linear(k: int, n: int, group_size: int, order: torch.Tensor | None,
                     gen: torch.Generator) -> dict[str, torch.Tensor]:
    """GPTQ tensors of a random symmetric 4-bit layer: qweight, qzeros, scales, g_idx (permuted by
    `order` for act-order, else in input order)."""
    groups = k // group_size
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
    qzeros = pack_qzeros(torch.full((groups, n), 8, dtype=torch.int32), 4, "gptq")
    std = GAIN / math.sqrt(k) / CODE_STD
    scales = (std * (0.5 + torch.rand(groups, n, generator=gen))).to(torch.float16)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if order is not None:  # what desc_act leaves behind: codes in input order, groups permuted
        g_idx = g_idx[order]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def randn(rows: int, cols: int, std: float, dtype: torch.dtype, gen: torch.Generator, chunk: int = 4096) -> torch.Tensor:
    """Normal [rows, cols] in `dtype`, drawn a few MB at a time (no fp32 copy of the whole)."""
    out = torch.empty(rows, cols, dtype=dtype)
    for i in range(0, rows, chunk):
        out[i : i + chunk] = torch.randn(min(chunk, rows - i), cols, generator=gen).mul_(std)
    return out


def tensors(cfg, args):
    """(name, tensor) pairs in checkpoint order, generated lazily."""
    gen = torch.Generator().manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    h, v = cfg.hidden_size, cfg.vocab_size
    yield "model.embed_tokens.weight", randn(v, h, 0.02, dtype, gen)
    if args.arch == "bluelm":
        yield "model.embed_layer_norm.weight", torch.ones(h, dtype=dtype)
        yield "model.embed_layer_norm.bias", torch.zeros(h, dtype=dtype)
    shapes = linear_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}"
        orders = {}  # one act-order permutation per input (SAME_INPUT)
        for block, names in PROJECTIONS:
            for name in names:
                k, n = shapes[name]
                key = f"{prefix}.{block}.{name}"
                if args.full:
                    yield f"{key}.weight", randn(n, k, GAIN / math.sqrt(k), dtype, gen)
                else:
                    order = None
                    if args.act_order:
                        source = SAME_INPUT.get(name, name)
                        if source not in orders:
                            orders[source] = torch.randperm(k, generator=gen)
                        order = orders[source]
                    for suffix, t in quantized_linear(k, n, args.group_size, order, gen).items():
                        yield f"{key}.{suffix}", t
        yield f"{prefix}.input_layernorm.weight", torch.ones(h, dtype=dtype)
        yield f"{prefix}.post_attention_layernorm.weight", torch.ones(h, dtype=dtype)
    yield "model.norm.weight", torch.ones(h, dtype=dtype)
    yield "lm_head.weight", randn(v, h, 1 / math.sqrt(h), dtype, gen)


def make_checkpoint(args) -> str:
    cfg = model_config(args)
    for name, (k, n) in linear_shapes(cfg).items():
        if not args.full and (k % args.group_size or k % 8 or n % 8):
            raise SystemExit(f"{name} is {k}x{n}: in_features must be a multiple of --group-size={args.group_size}, both of 8")
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        write_shards(tensors(cfg, args), tmp, int(args.max_shard_size * 1024**3))
        hf = cfg.to_dict()
        if args.full:
            write_json(os.path.join(tmp, "config.json"), hf)
        else:
            qc = QuantConfig(bits=4, group_size=args.group_size, sym=True, desc_act=args.act_order,
                             extra={"meta": {"quantizer": "bluelm-quant synthetic (random codes)"}})
            write_configs(tmp, hf, qc)
    return args.out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (outside the repository; must not exist unless --overwrite)")
    p.add_argument("--arch", choices=["bluelm", "llama"], default="bluelm", help="model family (default bluelm)")
    p.add_argument("--full", "--fp16", action="store_true", help="write full-precision .weight tensors (no quantization)")
    p.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16",
                   help="dtype of the unquantized tensors and config.json's torch_dtype (default float16)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=100096)
    p.add_argument("--context", type=int, default=2048, help="max_position_embeddings (default 2048)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="permuted g_idx, as desc_act checkpoints have")
    p.add_argument("--max-shard-size", type=float, default=DEFAULT_MAX_SHARD / 1024**3, help="GiB per shard (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if os.path.realpath(args.out).startswith(REPO + os.sep):
        raise SystemExit(f"--out={args.out} is inside the repository; write synthetic checkpoints elsewhere (e.g. /tmp)")
    t0 = time.perf_counter()
    make_checkpoint(args)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB ({size / 1024**3:.2f} GiB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
