"""Fine-tuning checkpoints: what `--resume` needs to continue exactly where a run stopped.

    <output_dir>/checkpoint-<step>/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT's standard files)
        optimizer.pt        AdamW's moments and the learning-rate schedule's position
        rng_state.pt        torch's generators (LoRA dropout draws from them)
        trainer_state.json  step, examples seen (the data position: the shuffled order of
                            each epoch is a function of the seed), losses so far, settings

Each checkpoint directory is written whole into a temporary sibling and renamed into place
(atomic.atomic_directory), so a crash leaves the previous checkpoint intact and never a
partial one that looks complete. The final adapter goes to <output_dir> itself, its
weights renamed into place before its config.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

from .atomic import atomic_directory, fsync_dir, write_json
from .workdir import ResumeError

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.pt"
RNG_FILE = "rng_state.pt"


def checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints under output_dir, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = re.fullmatch(PREFIX + r"(\d+)", name)
        path = os.path.join(output_dir, name)
        if m and os.path.isfile(os.path.join(path, STATE_FILE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(model, output_dir: str, state: dict, optimizer, scheduler, keep: int) -> str:
    """checkpoint-<state['step']> written atomically; older ones beyond the newest `keep` removed."""
    final = os.path.join(output_dir, f"{PREFIX}{state['step']}")
    with atomic_directory(final, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, os.path.join(tmp, OPTIMIZER_FILE))
        torch.save(rng_state(), os.path.join(tmp, RNG_FILE))
        write_json(os.path.join(tmp, STATE_FILE), state)
    for _, old in checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str) -> tuple[dict, dict, dict]:
    """(trainer state, optimizer + scheduler state, RNG state) of one checkpoint directory."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    optim = torch.load(os.path.join(path, OPTIMIZER_FILE), map_location="cpu", weights_only=False)
    rng = torch.load(os.path.join(path, RNG_FILE), map_location="cpu", weights_only=False)
    return state, optim, rng


def check_settings(saved: dict, current: dict, path: str) -> None:
    """A ResumeError listing every setting that differs from the checkpoint's."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        items = "; ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ResumeError(f"cannot resume from {path}: settings differ ({items}); use the same settings or start a "
                          "new --output_dir")


def save_final_adapter(model, output_dir: str) -> None:
    """The adapter's files into output_dir: written to a temporary directory there, then renamed into
    place, the config last (a config present means its weights are complete)."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-adapter-", dir=output_dir)
    try:
        model.save_pretrained(tmp)
        old_config = os.path.join(output_dir, "adapter_config.json")
        if os.path.exists(old_config):  # an earlier adapter's config must not vouch for the new weights
            os.unlink(old_config)
        names = sorted(os.listdir(tmp), key=lambda n: n == "adapter_config.json")
        for name in names:
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
        fsync_dir(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["OPTIMIZER_FILE", "PREFIX", "RNG_FILE", "STATE_FILE", "check_settings", "checkpoints", "load_checkpoint",
           "rng_state", "save_checkpoint", "save_final_adapter", "set_rng_state"]
