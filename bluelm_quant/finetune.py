"""LoRA fine-tuning of a 4-bit (or full-precision) model on instruction data: the loop.

`finetune(FinetuneConfig(...))` loads the model (load_model_and_tokenizer: 4-bit through
load_quantized), wraps it with PEFT LoRA (bluelm_quant.lora), and trains the adapters with
AdamW on the response tokens of the training file (sft_data.py). Every `save_steps` it
writes a checkpoint (finetune_state.py) that `resume=True` continues from exactly: same
adapter, optimizer moments, schedule, RNG and data position, so a resumed run ends with
the adapter an uninterrupted one would have. The dev file's loss is measured for the base
model before training, at each checkpoint and at the end.

One optimizer step = gradient_accumulation_steps micro-batches of batch_size_per_device
examples; the loss is the mean over the step's response tokens (every token weighs the
same, however the examples fall into micro-batches). The learning rate warms up linearly
over warmup_steps, then follows a cosine to zero at max_steps.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from . import finetune_state as fs
from .sft_data import IGNORE, STYLES, Example, collate, load_examples, take

log = logging.getLogger(__name__)


class FinetuneError(ValueError):
    """Fine-tuning settings that cannot work."""


@dataclass
class FinetuneConfig:
    """Names follow BlueLM's LoRA script (train/script/bluelm-7b-sft-lora.sh)."""

    model: str
    train_file: str
    output_dir: str
    dev_file: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    chat_format: str = "auto"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target: str = "all"  # "all" (every Linear but the head) or comma-separated names
    seq_len: int = 512
    batch_size_per_device: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    max_steps: int = 100
    save_steps: int = 50
    learning_rate: float = 3e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 42
    device: str = "cpu"
    dtype: torch.dtype | None = None  # None: float32 on CPU, the checkpoint's dtype elsewhere
    max_dev_examples: int | None = None
    save_total_limit: int = 2
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def check(self) -> None:
        positive = ("lora_rank", "seq_len", "batch_size_per_device", "gradient_accumulation_steps", "max_steps", "save_steps")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise FinetuneError(f"{name}={value!r} must be a positive integer")
        if not 0 <= self.lora_dropout < 1:
            raise FinetuneError(f"lora_dropout={self.lora_dropout} must lie in [0, 1)")
        if self.learning_rate <= 0 or self.lora_alpha <= 0:
            raise FinetuneError(f"learning_rate={self.learning_rate} and lora_alpha={self.lora_alpha} must be positive")
        if self.chat_format not in STYLES:
            raise FinetuneError(f"chat_format={self.chat_format!r} is not one of {', '.join(STYLES)}")

    def settings(self) -> dict:
        """What a resumed run must share with the checkpoint (max_steps and save_steps may change only
        if the schedule does not: it depends on max_steps, so that must match too)."""
        skip = {"output_dir", "resume", "overwrite", "progress", "device", "save_steps", "save_total_limit"}
        return {f.name: str(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name not in skip}


def lora_config(cfg: FinetuneConfig):
    from peft import LoraConfig

    target = "all-linear" if cfg.lora_target.strip().lower() in ("all", "all-linear") else [
        t.strip() for t in cfg.lora_target.split(",") if t.strip()]
    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=target,
                      task_type="CAUSAL_LM")


def schedule(cfg: FinetuneConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - cfg.warmup_steps) / span)))
    return factor


def loss_sum(model, batch: dict, device) -> tuple[torch.Tensor, int]:
    """(sum of the next-token losses over the labelled tokens, their count).

    Logits are computed only from the first position that predicts a response token on
    (`logits_to_keep`): the output head over a 49k-100k vocabulary is a large share of a
    step's compute and memory, and the prompt's logits are never used.
    """
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    target = labels[:, 1:]  # position p predicts token p + 1
    used = (target != IGNORE).any(dim=0).nonzero()
    start = int(used[0]) if used.numel() else 0
    keep = torch.arange(start, ids.shape[1] - 1, device=ids.device)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep).logits
    target = target[:, start:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE, reduction="sum")
    return loss, int((target != IGNORE).sum())


@torch.no_grad()
def dev_loss(model, examples: list[Example], batch_size: int, pad_id: int, device) -> float:
    """Mean loss per response token over `examples`, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        s, n = loss_sum(model, collate(examples[i : i + batch_size], pad_id), device)
        total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


def enable_checkpointing(model) -> None:
    """Recompute each decoder layer in backward (non-reentrant: no need for inputs that require grad).
    transformers 5.20+ names it activation checkpointing; older releases gradient checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _prepare_output(cfg: FinetuneConfig) -> str | None:
    """The checkpoint to resume from, or None for a fresh run (refusing to mix runs in one directory)."""
    found = fs.checkpoints(cfg.output_dir)
    if cfg.resume:
        if not found:
            raise FinetuneError(f"--resume: {cfg.output_dir} holds no checkpoint-<step> directory to resume from")
        return found[-1][1]
    if found and not cfg.overwrite:
        raise FinetuneError(f"{cfg.output_dir} already holds checkpoints of a run ({os.path.basename(found[-1][1])}); "
                            "pass --resume to continue it or --overwrite to start over")
    for _, path in found:
        import shutil

        shutil.rmtree(path, ignore_errors=True)
    return None


def finetune(cfg: FinetuneConfig, on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train; returns a report (losses per step, dev losses, seconds per step, tokens/s, paths).

    on_step(step, loss) runs after every optimizer step and checkpoint (tests stop a run there).
    """
    from .hf import load_model_and_tokenizer
    from .lora import get_peft_model, load_adapter, require_peft

    cfg.check()
    # Before the model loads: without peft (not in every preinstalled set) this was a raw
    # ModuleNotFoundError traceback after the load; now the one-line LoRAError saying what to install.
    require_peft()
    resume_from = _prepare_output(cfg)
    torch.manual_seed(cfg.seed)
    dtype = cfg.dtype or (torch.float32 if str(cfg.device).startswith("cpu") else None)
    model, tokenizer = load_model_and_tokenizer(cfg.model, device=cfg.device, dtype=dtype)
    model_type = getattr(model.config, "model_type", None)
    train, style = load_examples(cfg.train_file, tokenizer, model_type, cfg.seq_len, cfg.chat_format,
                                 cfg.prompt_column, cfg.response_column)
    dev = None
    if cfg.dev_file:
        dev, _ = load_examples(cfg.dev_file, tokenizer, model_type, cfg.seq_len, style, cfg.prompt_column, cfg.response_column)
        dev = dev[: cfg.max_dev_examples] if cfg.max_dev_examples else dev
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    device = next(model.parameters()).device
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    if resume_from:
        model = load_adapter(model, resume_from, is_trainable=True)
    else:
        model = get_peft_model(model, lora_config(cfg))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(cfg))
    state = {"step": 0, "examples_seen": 0, "losses": [], "dev_losses": {}, "settings": cfg.settings(), "style": style,
             "seconds": 0.0, "tokens": 0}
    if resume_from:
        saved, optim, rng = fs.load_checkpoint(resume_from)
        fs.check_settings(saved["settings"], cfg.settings(), resume_from)
        optimizer.load_state_dict(optim["optimizer"])
        scheduler.load_state_dict(optim["scheduler"])
        fs.set_rng_state(rng)
        state = saved
        log.info("resuming from %s (step %d)", resume_from, state["step"])
    elif dev is not None:
        with model.disable_adapter():
            state["dev_losses"]["base"] = dev_loss(model, dev, cfg.batch_size_per_device, pad_id, device)
    _train(model, cfg, state, train, dev, optimizer, scheduler, pad_id, device, on_step)
    fs.save_final_adapter(model, cfg.output_dir)
    return _report(cfg, state, len(train), len(dev) if dev else 0, sum(p.numel() for p in params))


def _train(model, cfg, state, train, dev, optimizer, scheduler, pad_id, device, on_step) -> None:
    from tqdm.auto import tqdm

    per_step = cfg.batch_size_per_device * cfg.gradient_accumulation_steps
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=state["step"], desc="finetune", unit="step", disable=not cfg.progress)
    while state["step"] < cfg.max_steps:
        start = time.perf_counter()
        examples = take(train, cfg.seed, state["examples_seen"], per_step)
        batches = [collate(examples[i : i + cfg.batch_size_per_device], pad_id)
                   for i in range(0, per_step, cfg.batch_size_per_device)]
        labelled = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches)
        total = 0.0
        for batch in batches:
            s, _ = loss_sum(model, batch, device)
            (s / labelled).backward()
            total += float(s.detach())
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start
        tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        state["step"] += 1
        state["examples_seen"] += per_step
        state["losses"].append(total / labelled)
        state["seconds"] += elapsed
        state["tokens"] += tokens
        bar.set_postfix(loss=f"{total / labelled:.3f}", tok_s=f"{tokens / elapsed:.0f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        bar.update(1)
        if state["step"] % cfg.save_steps == 0 or state["step"] == cfg.max_steps:
            if dev is not None:
                state["dev_losses"][str(state["step"])] = dev_loss(model, dev, cfg.batch_size_per_device, pad_id, device)
                bar.write(f"step {state['step']}: train loss {total / labelled:.4f}, dev loss {state['dev_losses'][str(state['step'])]:.4f}")
            fs.save_checkpoint(model, cfg.output_dir, state, optimizer, scheduler, cfg.save_total_limit)
        if on_step is not None:
            on_step(state["step"], total / labelled)
    bar.close()
    model.eval()


def _report(cfg, state, n_train, n_dev, trainable) -> dict:
    steps = max(len(state["losses"]), 1)
    dev = state["dev_losses"]
    final = dev.get(str(state["step"]))
    return {
        "output_dir": cfg.output_dir, "steps": state["step"], "train_examples": n_train, "dev_examples": n_dev,
        "trainable_parameters": trainable, "style": state["style"], "losses": state["losses"],
        "loss_first": state["losses"][0] if state["losses"] else None, "loss_last": state["losses"][-1] if state["losses"] else None,
        "dev_loss_base": dev.get("base"), "dev_loss_final": final, "dev_losses": dev,
        "seconds_per_step": state["seconds"] / steps, "tokens_per_second": state["tokens"] / max(state["seconds"], 1e-9),
    }


__all__ = ["FinetuneConfig", "FinetuneError", "dev_loss", "enable_checkpointing", "finetune", "lora_config", "loss_sum", "schedule"]
