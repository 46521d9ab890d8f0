"""LoRA fine-tuning of a 4-bit GPTQ model (QLoRA-style) on instruction data, through PEFT.

    bluelm-finetune --model out/BlueLM-7B-Chat-gptq-4bit-g128 --train_file train.json \\
        --prompt_column inputs --response_column targets --output_dir out/lora \\
        --lora_rank 8 --lora_alpha 16 --seq_len 2048 --gradient_checkpointing --max_steps 9000

The flags are those of BlueLM's LoRA script (train/script/bluelm-7b-sft-lora.sh). Data:
JSON / JSON lines of BELLE {instruction, input, output}, {prompt, response} or BlueLM
{inputs, targets} records (detected), or any two columns named with --prompt_column and
--response_column; the loss counts the response tokens only. The adapter is saved in
PEFT's format (adapter_config.json + adapter_model.safetensors) in --output_dir, with a
checkpoint (adapter, optimizer, RNG, data position) every --save_steps that --resume
continues from. Use it with bluelm-chat / bluelm-eval-ppl --adapter DIR, or write a merged
model with bluelm-merge-adapter.

With no --model and no --train_file: the built-in demo, the bundled 4-bit SmolLM2-135M
(quantized once by bluelm-quant and cached) on a small bundled English + Chinese
instruction set, a few minutes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import logging
import resource
import sys
import warnings

from . import add_debug_flag, run_tool

DTYPES = ("float32", "float16", "bfloat16")
# General defaults; the demo's own are in finetune_demo.SETTINGS (a flag given on the command line wins).
DEFAULTS = dict(lora_rank=8, lora_alpha=16.0, lora_dropout=0.05, seq_len=512, batch_size_per_device=1,
                gradient_accumulation_steps=1, max_steps=1000, save_steps=200, learning_rate=3e-4, warmup_steps=0)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bluelm-finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = "(default %s; demo %s)"
    from ..finetune_demo import SETTINGS as demo

    def default(name):
        return d % (DEFAULTS[name], demo[name])

    p.add_argument("--model", help="4-bit (or full-precision) model directory (default: the demo's 4-bit SmolLM2)")
    p.add_argument("--train_file", help="training records, .json or .jsonl (default: the demo's bundled set)")
    p.add_argument("--dev_file", help="held-out records: their loss is reported before, during and after training")
    p.add_argument("--output_dir", help="where the adapter and checkpoints go (default out/<model name>-lora)")
    p.add_argument("--prompt_column", help="record field(s) holding the prompt; comma-separated fields are joined by newlines "
                                           "(default: detected: instruction+input, prompt or inputs)")
    p.add_argument("--response_column", help="record field holding the response (default: detected: output, response or targets)")
    p.add_argument("--chat_format", choices=["auto", "bluelm", "raw", "template", "plain"], default="auto",
                   help="how a prompt/response pair is framed: BlueLM's [|Human|]:..[|AI|]: (bluelm), as written (raw, for "
                        "BlueLM's inputs/targets data), the tokenizer's chat template, or prompt\\nresponse (plain); "
                        "auto picks by the data and model (default)")
    p.add_argument("--lora_rank", type=int, help=f"rank r of each adapter (A: r x in, B: out x r) {default('lora_rank')}")
    p.add_argument("--lora_alpha", type=float, help=f"adapter output scaled by lora_alpha / lora_rank {default('lora_alpha')}")
    p.add_argument("--lora_dropout", type=float, help=f"dropout on the adapters' input during training {default('lora_dropout')}")
    p.add_argument("--lora_target", default="all",
                   help="Linear layers to adapt: 'all' (every one but the output head) or names such as q_proj,v_proj (default all)")
    p.add_argument("--seq_len", type=int, help=f"longest example in tokens; longer ones are cut {default('seq_len')}")
    p.add_argument("--batch_size_per_device", type=int, help=f"examples per forward/backward pass {default('batch_size_per_device')}")
    p.add_argument("--gradient_accumulation_steps", type=int,
                   help=f"passes whose gradients are summed before one optimizer step {default('gradient_accumulation_steps')}")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in backward instead of keeping them (less memory, ~30%% slower)")
    p.add_argument("--max_steps", type=int, help=f"optimizer steps to train {default('max_steps')}")
    p.add_argument("--save_steps", type=int, help=f"write a checkpoint (and measure the dev loss) every N steps {default('save_steps')}")
    p.add_argument("--learning_rate", type=float, help=f"peak AdamW learning rate, cosine-decayed to 0 at max_steps {default('learning_rate')}")
    p.add_argument("--warmup_steps", type=int, help=f"steps of linear learning-rate warm-up {default('warmup_steps')}")
    p.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    p.add_argument("--max_grad_norm", type=float, default=1.0, help="clip the adapters' gradient norm to this; 0 = off (default 1)")
    p.add_argument("--seed", type=int, default=42, help="seed of the adapters' initialisation, data order and dropout (default 42)")
    p.add_argument("--max_dev_examples", type=int, help="measure the dev loss on the first N dev records only")
    p.add_argument("--save_total_limit", type=int, default=2, help="checkpoints kept (the newest; default 2)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output_dir (same settings)")
    p.add_argument("--overwrite", action="store_true", help="start over in an --output_dir that holds an earlier run's checkpoints")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, help="compute dtype of the base model (default: float32 on CPU, the checkpoint's on GPU)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, one per core; on a busy machine 1 "
                                               "can be several times faster than oversubscribed cores)")
    p.add_argument("--cache-dir", help="where the demo model is cached (default ~/.cache/bluelm-quant or $BLUELM_QUANT_CACHE)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_debug_flag(p)
    return p


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (args.model is None) != (args.train_file is None):
        p.error("give both --model and --train_file, or neither (the built-in demo)")
    return run_tool(finetune_command, args)


def finetune_command(args: argparse.Namespace) -> int:
    import os

    import torch

    from .. import finetune_demo as demo
    from ..finetune import FinetuneConfig, finetune

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # PEFT asks transformers 5.20+ for the old name of a property; the warning is not the user's to act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    is_demo = args.model is None
    defaults = demo.SETTINGS if is_demo else DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if is_demo:
        print("No --model / --train_file given: the built-in demo (4-bit SmolLM2-135M-Instruct, bundled en+zh instructions).")
        args.model = str(demo.demo_model(args.cache_dir, progress=not args.quiet))
        args.train_file, args.dev_file = str(demo.TRAIN_FILE), args.dev_file or str(demo.DEV_FILE)
    # The demo may replace its own default output on a re-run, never a directory the user named.
    replace_default = is_demo and args.output_dir is None and not args.resume
    args.output_dir = args.output_dir or (demo.OUTPUT_DIR if is_demo else os.path.join("out", os.path.basename(os.path.normpath(args.model)) + "-lora"))
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = FinetuneConfig(
        model=args.model, train_file=args.train_file, dev_file=args.dev_file, output_dir=args.output_dir,
        prompt_column=args.prompt_column, response_column=args.response_column, chat_format=args.chat_format,
        lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lora_target=args.lora_target,
        seq_len=args.seq_len, batch_size_per_device=args.batch_size_per_device,
        gradient_accumulation_steps=args.gradient_accumulation_steps, gradient_checkpointing=args.gradient_checkpointing,
        max_steps=args.max_steps, save_steps=args.save_steps, learning_rate=args.learning_rate, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed, device=device,
        dtype=getattr(torch, args.dtype) if args.dtype else None, max_dev_examples=args.max_dev_examples,
        save_total_limit=args.save_total_limit, resume=args.resume, overwrite=args.overwrite or replace_default,
        progress=not args.quiet,
    )
    report = finetune(cfg)
    _print_report(report)
    if is_demo:
        _demo_samples(cfg)
    return 0


def _print_report(r: dict) -> None:
    losses = r["losses"]
    tail = losses[-5:]
    print(f"\n{r['steps']} steps on {r['train_examples']} examples ({r['style']} format), "
          f"{r['trainable_parameters']:,} trainable parameters")
    print(f"{'train loss, first step':<34}{r['loss_first']:>10.4f}")
    print(f"{'train loss, mean of last 5 steps':<34}{sum(tail) / len(tail):>10.4f}")
    if r["dev_loss_base"] is not None:
        print(f"{'dev loss, base model':<34}{r['dev_loss_base']:>10.4f}   ({r['dev_examples']} examples)")
    if r["dev_loss_final"] is not None:
        print(f"{'dev loss, with the adapter':<34}{r['dev_loss_final']:>10.4f}")
    print(f"{'seconds per step':<34}{r['seconds_per_step']:>10.2f}")
    print(f"{'tokens per second':<34}{r['tokens_per_second']:>10.0f}")
    print(f"{'peak RSS (GiB)':<34}{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2:>10.2f}")
    print(f"adapter: {r['output_dir']} (adapter_config.json, adapter_model.safetensors)")


def _demo_samples(cfg) -> None:
    """Greedy answers of the base model and of the tuned one to two prompts outside the data."""
    import torch

    from ..chat import encode_prompt
    from ..finetune_demo import PROMPTS
    from ..hf import load_model_and_tokenizer
    from ..lora import load_adapter

    model, tokenizer = load_model_and_tokenizer(cfg.model, device=cfg.device, dtype=torch.float32)
    model = load_adapter(model, cfg.output_dir)
    for prompt in PROMPTS:
        ids = torch.tensor([encode_prompt(model, tokenizer, prompt)], device=cfg.device)
        answers = {}
        with torch.no_grad():
            with model.disable_adapter():
                answers["base"] = model.generate(input_ids=ids, max_new_tokens=48, do_sample=False)
            answers["tuned"] = model.generate(input_ids=ids, max_new_tokens=48, do_sample=False)
        print(f"\n{prompt}")
        for name, out in answers.items():
            print(f"  {name:>5}: {tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()}")


if __name__ == "__main__":
    sys.exit(main())
