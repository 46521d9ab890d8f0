#!/usr/bin/env python
"""Write a synthetic BlueLM checkpoint with the real 7B layout (for memory and speed tests).

Default: BlueLM-7B shapes (32 layers, hidden 4096, FFN 11008, 32 heads, vocab 100096),
4-bit GPTQ, group size 128, random codes, fp16 scales, sharded safetensors (2 GB shards)
+ index + quantize_config.json + config.json (model_type BlueLM): ~5.0 GB on disk.
--fp16 writes the full-precision counterpart instead (~15 GB at 7B size). --layers,
--hidden, --intermediate, --heads, --vocab shrink it for CI.

The weights are random but scaled so activations stay finite through every layer in
fp16 (each Linear roughly preserves the variance of its input). Shard boundaries are
planned from the shapes, so each tensor is generated and appended to its shard file
right away: the generator holds one tensor (at most the 0.8 GB embedding) at a time.

    python tools/make_synthetic_checkpoint.py --out /tmp/bluelm7b-synth-4bit
"""
from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bluelm_quant.atomic import atomic_directory, write_json  # noqa: E402
from bluelm_quant.checkpoint import DEFAULT_MAX_SHARD, write_configs  # noqa: E402
from bluelm_quant.config import QuantConfig  # noqa: E402
from bluelm_quant.models.bluelm import BlueLMConfig  # noqa: E402
from bluelm_quant.packing import pack_qzeros  # noqa: E402

PROJECTIONS = (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
# Target weight std = GAIN / sqrt(in_features): each Linear keeps its input's scale.
GAIN = 0.5
# Std of a uniform 4-bit code around the symmetric zero 8.
CODE_STD = math.sqrt((16**2 - 1) / 12)


def bluelm_config(args) -> BlueLMConfig:
    return BlueLMConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, max_position_embeddings=args.context,
        architectures=["BlueLMForCausalLM"], torch_dtype=args.config_dtype,
    )


def linear_shapes(cfg: BlueLMConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) per projection name."""
    h, f = cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "o_proj": (h, h),
            "gate_proj": (h, f), "up_proj": (h, f), "down_proj": (f, h)}


def quantized_linear(k: int, n: int, group_size: int, act_order: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """GPTQ tensors of a random symmetric 4-bit layer: qweight, qzeros, scales, g_idx."""
    groups = k // group_size
    qweight = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, generator=gen)
    qzeros = pack_qzeros(torch.full((groups, n), 8, dtype=torch.int32), 4, "gptq")
    std = GAIN / math.sqrt(k) / CODE_STD
    scales = (std * (0.5 + torch.rand(groups, n, generator=gen))).to(torch.float16)
    g_idx = torch.arange(k, dtype=torch.int32) // group_size
    if act_order:  # what desc_act leaves behind: codes in input order, groups permuted
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}


def randn_fp16(rows: int, cols: int, std: float, gen: torch.Generator, chunk: int = 4096) -> torch.Tensor:
    """Normal fp16 [rows, cols], drawn a few MB at a time (no fp32 copy of the whole)."""
    out = torch.empty(rows, cols, dtype=torch.float16)
    for i in range(0, rows, chunk):
        out[i : i + chunk] = torch.randn(min(chunk, rows - i), cols, generator=gen).mul_(std)
    return out


def tensors(cfg: BlueLMConfig, fp16: bool, group_size: int, act_order: bool, seed: int):
    """(name, tensor) pairs in checkpoint order, generated lazily."""
    gen = torch.Generator().manual_seed(seed)
    h, v = cfg.hidden_size, cfg.vocab_size
    yield "model.embed_tokens.weight", randn_fp16(v, h, 0.02, gen)
    yield "model.embed_layer_norm.weight", torch.ones(h, dtype=torch.float16)
    yield "model.embed_layer_norm.bias", torch.zeros(h, dtype=torch.float16)
    shapes = linear_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        prefix = f"model.layers.{i}"
        for block, names in PROJECTIONS:
            for name in names:
                k, n = shapes[name]
                key = f"{prefix}.{block}.{name}"
                if fp16:
                    yield f"{key}.weight", randn_fp16(n, k, GAIN / math.sqrt(k), gen)
                else:
                    for suffix, t in quantized_linear(k, n, group_size, act_order, gen).items():
                        yield f"{key}.{suffix}", t
        yield f"{prefix}.input_layernorm.weight", torch.ones(h, dtype=torch.float16)
        yield f"{prefix}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.float16)
    yield "model.norm.weight", torch.ones(h, dtype=torch.float16)
    yield "lm_head.weight", randn_fp16(v, h, 1 / math.sqrt(h), gen)


ST_DTYPES = {torch.float16: "F16", torch.int32: "I32"}


def plan_shards(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_shard_size: int) -> list[list[int]]:
    """Indices of `specs` per shard, in order, each shard at most max_shard_size bytes (or one tensor)."""
    shards, size = [[]], 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    return shards


def write_streamed(items, specs, out_dir: str, max_shard_size: int) -> None:
    """Write (name, tensor) pairs, arriving in `specs` order, as safetensors shards + index.

    The safetensors header (names, dtypes, shapes, offsets) is known from the specs, so it
    is written first and each tensor's bytes are appended as soon as it is generated.
    """
    shards = plan_shards(specs, max_shard_size)
    weight_map, total = {}, 0
    items = iter(items)
    for s, indices in enumerate(shards, start=1):
        fname = f"model-{s:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for i in indices:
            name, shape, dtype = specs[i]
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        with open(os.path.join(out_dir, fname), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for i in indices:
                name, t = next(items)
                if name != specs[i][0] or tuple(t.shape) != specs[i][1] or t.dtype != specs[i][2]:
                    raise RuntimeError(f"generated {name} {tuple(t.shape)} {t.dtype} does not match its plan {specs[i]}")
                f.write(t.contiguous().numpy().data)  # the bytes, without a copy
        total += offset
    write_json(os.path.join(out_dir, "model.safetensors.index.json"), {"metadata": {"total_size": total}, "weight_map": weight_map})


def tensor_specs(cfg: BlueLMConfig, fp16: bool, group_size: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of every tensor, in the order `tensors` yields them."""
    h, v, f16, i32 = cfg.hidden_size, cfg.vocab_size, torch.float16, torch.int32
    specs = [("model.embed_tokens.weight", (v, h), f16), ("model.embed_layer_norm.weight", (h,), f16),
             ("model.embed_layer_norm.bias", (h,), f16)]
    shapes = linear_shapes(cfg)
    for i in range(cfg.num_hidden_layers):
        for block, names in PROJECTIONS:
            for name in names:
                k, n = shapes[name]
                key = f"model.layers.{i}.{block}.{name}"
                if fp16:
                    specs.append((f"{key}.weight", (n, k), f16))
                else:
                    g = k // group_size
                    specs += [(f"{key}.qweight", (k // 8, n), i32), (f"{key}.qzeros", (g, n // 8), i32),
                              (f"{key}.scales", (g, n), f16), (f"{key}.g_idx", (k,), i32)]
        specs += [(f"model.layers.{i}.input_layernorm.weight", (h,), f16),
                  (f"model.layers.{i}.post_attention_layernorm.weight", (h,), f16)]
    return specs + [("model.norm.weight", (h,), f16), ("lm_head.weight", (v, h), f16)]


def make_checkpoint(out: str, cfg: BlueLMConfig, fp16: bool = False, group_size: int = 128, act_order: bool = False,
                    seed: int = 0, max_shard_size: int = DEFAULT_MAX_SHARD, overwrite: bool = False) -> str:
    for name, (k, n) in linear_shapes(cfg).items():
        if not fp16 and (k % group_size or k % 8 or n % 8):
            raise SystemExit(f"{name} is {k}x{n}: in_features must be a multiple of --group-size={group_size}, both of 8")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        specs = tensor_specs(cfg, fp16, group_size)
        write_streamed(tensors(cfg, fp16, group_size, act_order, seed), specs, tmp, max_shard_size)
        hf = cfg.to_dict()
        if fp16:
            write_json(os.path.join(tmp, "config.json"), hf)
        else:
            qc = QuantConfig(bits=4, group_size=group_size, sym=True, desc_act=act_order,
                             extra={"meta": {"quantizer": "bluelm-quant synthetic (random codes)"}})
            write_configs(tmp, hf, qc)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (outside the repository; must not exist unless --overwrite)")
    p.add_argument("--fp16", action="store_true", help="write the fp16 counterpart (.weight tensors, no quantization)")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=100096)
    p.add_argument("--context", type=int, default=2048, help="max_position_embeddings (default 2048)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true", help="permuted g_idx, as desc_act checkpoints have")
    p.add_argument("--config-dtype", default="float16", choices=["float16", "bfloat16"],
                   help="torch_dtype in config.json (the published BlueLM says bfloat16; default float16)")
    p.add_argument("--max-shard-size", type=float, default=DEFAULT_MAX_SHARD / 1024**3, help="GiB per shard (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    repo = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    if os.path.realpath(args.out).startswith(repo + os.sep):
        raise SystemExit(f"--out={args.out} is inside the repository; write synthetic checkpoints elsewhere (e.g. /tmp)")
    cfg = bluelm_config(args)
    t0 = time.perf_counter()
    make_checkpoint(args.out, cfg, args.fp16, args.group_size, args.act_order, args.seed,
                    int(args.max_shard_size * 1024**3), args.overwrite)
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {args.out}: {size / 1e9:.2f} GB ({size / 1024**3:.2f} GiB) in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
