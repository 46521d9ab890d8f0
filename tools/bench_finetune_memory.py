#!/usr/bin/env python
"""Peak training memory of LoRA on a 4-bit 7B-shaped model vs the same LoRA on a bf16 one.

Writes random checkpoints with LLaMA-7B layer shapes (hidden 4096, FFN 11008, 32 heads,
vocab 32000) but only 1 and 2 decoder layers, 4-bit GPTQ (group 128) and bf16
(tools/make_synthetic_checkpoint.py; ~0.7 GB and ~1.3 GB for the 2-layer pair, under --dir,
never in the repository). Each (checkpoint, gradient checkpointing on/off) trains in a child
process of its own: LoRA r=8 on every Linear layer but the head, bf16 compute, AdamW, batch 1
at --seq-len tokens, --steps steps; the child's peak RSS is read with wait4.

Per layer = peak(2 layers) - peak(1 layer): the layer's weights, its adapters with their
gradients and AdamW moments, and its share of the activations kept for backward. The
rest (embedding, head, logits, the Python/torch runtime) is the same for both and cancels.

The GPU estimate for a whole 7B model (32 layers) at the same seq_len and batch 1 adds up:
  weights      4-bit layers as stored (qweight + qzeros + scales + g_idx, from the
               synthetic checkpoint's bytes) or 2 bytes per bf16 weight, + the fp16
               embedding and head (vocab x hidden x 2 bytes each)
  adapters     r x (in + out) parameters per adapted Linear, float32, x 4: the weights,
               their gradients and AdamW's two moments (16 bytes per parameter)
  activations  32 x (measured per-layer peak - that layer's weights and adapter state),
               i.e. what the CPU run kept for backward in bf16, the dtype a GPU run uses
  logits       seq_len x vocab x (2 bytes bf16 + 4 bytes float32 for the loss) x 2 (+ grad)
  CUDA context 0.5 GiB (typical for the CUDA runtime and cuBLAS workspaces)

    python tools/bench_finetune_memory.py --dir /tmp/finetune-mem
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
GIB = 1024**3
CUDA_CONTEXT = 0.5 * GIB

CHILD = r"""
import json, os, resource, time, torch
torch.manual_seed(0)
from peft import LoraConfig
from bluelm_quant import lora
from bluelm_quant.finetune import enable_checkpointing, loss_sum
from bluelm_quant.modeldir import ModelDir
path, ckpt, seq, steps, vocab = {path!r}, {ckpt!r}, {seq!r}, {steps!r}, {vocab!r}
if ModelDir(path).is_quantized:
    from bluelm_quant.loading import load_quantized
    model = load_quantized(path, dtype=torch.bfloat16)
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
model.requires_grad_(False)
model.config.use_cache = False
if ckpt:
    enable_checkpointing(model)
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = lora.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear"))
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-4)
ids = torch.randint(0, vocab, (1, seq), generator=torch.Generator().manual_seed(0))
batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
model.train()
times = []
for _ in range(steps):
    t = time.perf_counter()
    s, n = loss_sum(model, batch, torch.device("cpu"))
    (s / n).backward()
    opt.step(); opt.zero_grad(set_to_none=True)
    times.append(time.perf_counter() - t)
print(json.dumps(dict(loaded=loaded, adapter_params=sum(p.numel() for p in params), seconds_per_step=min(times))))
"""


def make_checkpoint(path: str, layers: int, full: bool, args) -> None:
    if os.path.exists(os.path.join(path, "config.json")):
        return
    cmd = [sys.executable, os.path.join(TOOLS, "make_synthetic_checkpoint.py"), "--out", path, "--arch", "llama",
           "--layers", str(layers), "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
           "--heads", str(args.heads), "--vocab", str(args.vocab), "--overwrite"]
    if full:
        cmd += ["--full", "--dtype", "bfloat16"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def run_child(path: str, checkpointing: bool, args) -> dict:
    code = CHILD.format(path=path, ckpt=checkpointing, seq=args.seq_len, steps=args.steps, vocab=args.vocab)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"training child failed on {path} (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak"] = usage.ru_maxrss * 1024  # Linux: KiB
    return result


def layer_weight_bytes(path: str) -> int:
    """Bytes of decoder layer 0's tensors in a synthetic checkpoint (from the safetensors headers)."""
    from safetensors import safe_open

    total = 0
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    if key.startswith("model.layers.0."):
                        s = f.get_slice(key)
                        n = 1
                        for d in s.get_shape():
                            n *= d
                        total += n * {"I32": 4, "F16": 2, "BF16": 2, "F32": 4}[s.get_dtype()]
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="where the synthetic checkpoints go (created if missing); outside the repo")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="training steps per run (default 2: the second is warm)")
    p.add_argument("--full-layers", type=int, default=32, help="decoder layers of the model the GPU estimate is for (default 32)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    rows = {}
    for kind, full in (("4-bit", False), ("bf16", True)):
        paths = {n: os.path.join(os.path.abspath(args.dir), f"{kind}-{n}layer") for n in (1, 2)}
        for n, path in paths.items():
            make_checkpoint(path, n, full, args)
        for ckpt in (False, True):
            runs = {n: run_child(path, ckpt, args) for n, path in paths.items()}
            rows[(kind, ckpt)] = dict(
                peak_1=runs[1]["peak"], peak_2=runs[2]["peak"], per_layer=runs[2]["peak"] - runs[1]["peak"],
                adapter_per_layer=runs[2]["adapter_params"] - runs[1]["adapter_params"],
                seconds_per_step=runs[2]["seconds_per_step"], weights_per_layer=layer_weight_bytes(paths[1]),
                load_peak_2=runs[2]["loaded"],
            )
    _print_table(rows, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({f"{k} ckpt={c}": v for (k, c), v in rows.items()}, f, indent=2)
    return 0


def _print_table(rows: dict, args) -> None:
    print(f"\nLoRA r=8 on all 7 Linear layers, LLaMA-7B layer shapes, bf16 compute, batch 1 x {args.seq_len} tokens, CPU")
    print(f"{'model':<7}{'grad ckpt':>10}{'peak 1 layer':>14}{'peak 2 layers':>15}{'(after load)':>14}{'per layer':>11}"
          f"{'s/step (2 layers)':>19}")
    for (kind, ckpt), r in rows.items():
        print(f"{kind:<7}{'on' if ckpt else 'off':>10}{r['peak_1'] / GIB:>13.2f}G{r['peak_2'] / GIB:>14.2f}G"
              f"{r['load_peak_2'] / GIB:>13.2f}G{r['per_layer'] / GIB:>10.3f}G{r['seconds_per_step']:>19.1f}")
    print("(after load: the peak before training started; the peaks above it were reached while training. s/step: torch's\n"
          " default thread count, the fastest of --steps steps; on a busy machine only a rough guide)")
    for ckpt in (False, True):
        q, b = rows[("4-bit", ckpt)]["per_layer"], rows[("bf16", ckpt)]["per_layer"]
        # At toy sizes a second layer can fit in memory the first one freed: no growth to divide by.
        ratio = f"{q / b:.2f}" if b > 0 else "n/a (the bf16 run did not grow with its second layer)"
        print(f"per-layer peak, 4-bit / bf16, checkpointing {'on' if ckpt else 'off'}: {ratio}")
    print(f"\nEstimate for a whole {args.full_layers}-layer 7B on a GPU (seq_len {args.seq_len}, batch 1):")
    embed = 2 * args.vocab * args.hidden * 2
    logits = args.seq_len * args.vocab * (2 + 4) * 2
    print(f"{'model':<7}{'grad ckpt':>10}{'weights':>10}{'adapters':>10}{'activations':>13}{'logits':>8}{'CUDA':>6}{'total':>8}")
    for (kind, ckpt), r in rows.items():
        adapter_state = 16 * r["adapter_per_layer"]
        weights = args.full_layers * r["weights_per_layer"] + embed
        acts = args.full_layers * max(0, r["per_layer"] - r["weights_per_layer"] - adapter_state)
        adapters = args.full_layers * adapter_state
        total = weights + adapters + acts + logits + CUDA_CONTEXT
        print(f"{kind:<7}{'on' if ckpt else 'off':>10}{weights / GIB:>9.2f}G{adapters / GIB:>9.2f}G{acts / GIB:>12.2f}G"
              f"{logits / GIB:>7.2f}G{CUDA_CONTEXT / GIB:>5.1f}G{total / GIB:>7.2f}G")


if __name__ == "__main__":
    sys.exit(main())
