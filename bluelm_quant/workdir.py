"""The partial output of a quantization run: settings, and one file per finished layer.

Layout of `<out>.partial/`:
  settings.json            what produced these results (compared on --resume)
  layers/layer_0007.safetensors   packed tensors of each Linear of layer 7, stats in metadata
A layer file appears only once it is complete (written to a temporary name, fsynced,
renamed), so after a kill -9 every file present is whole. The final checkpoint is
assembled in `<out>.partial/final/` and renamed to `<out>` as the last step.
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import fsync_dir, fsync_tree, write_json

log = logging.getLogger(__name__)


class ResumeError(ValueError):
    """A partial run cannot be continued with these settings."""


class WorkDir:
    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.path = self.out_dir + ".partial"
        self.layers_dir = os.path.join(self.path, "layers")
        self.final_dir = os.path.join(self.path, "final")

    def exists(self) -> bool:
        return os.path.isdir(self.path)

    def start(self, settings: dict, resume: bool, overwrite: bool) -> int:
        """Prepare the directory; returns how many leading layers are already done."""
        if os.path.exists(self.out_dir) and not overwrite:
            raise FileExistsError(f"{self.out_dir} already exists; pass --overwrite to replace it, or choose another --out")
        if self.exists() and not resume:
            if not overwrite:
                raise FileExistsError(
                    f"a partial run exists at {self.path}; pass --resume to continue it or --overwrite to start over"
                )
            shutil.rmtree(self.path)
        if resume and not self.exists():
            log.info("--resume: no partial run at %s, starting from the first layer", self.path)
        if resume and self.exists():
            self._check_settings(settings)
        else:
            os.makedirs(self.layers_dir, exist_ok=True)
            write_json(os.path.join(self.path, "settings.json"), settings)
        shutil.rmtree(self.final_dir, ignore_errors=True)
        return self.done_layers()

    def _check_settings(self, settings: dict) -> None:
        path = os.path.join(self.path, "settings.json")
        try:
            with open(path, encoding="utf-8") as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ResumeError(f"cannot read {path} ({e}); start over with --overwrite") from None
        for key in sorted(set(saved) | set(settings)):
            if saved.get(key) != settings.get(key):
                raise ResumeError(
                    f"cannot resume {self.path}: setting {key!r} was {saved.get(key)!r} there but is "
                    f"{settings.get(key)!r} now. Use the same settings, or --overwrite to start over"
                )

    def layer_path(self, index: int) -> str:
        return os.path.join(self.layers_dir, f"layer_{index:04d}.safetensors")

    def done_layers(self) -> int:
        n = 0
        while os.path.exists(self.layer_path(n)):
            n += 1
        return n

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], stats: dict) -> None:
        final = self.layer_path(index)
        tmp = final + ".tmp"
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"stats": json.dumps(stats)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fsync_dir(self.layers_dir)

    def load_layer(self, index: int) -> tuple[dict[str, torch.Tensor], dict]:
        with safe_open(self.layer_path(index), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            stats = json.loads(f.metadata()["stats"])
        return tensors, stats

    def load_stats(self, index: int) -> dict:
        """A finished layer's stats, from the file's header alone."""
        with safe_open(self.layer_path(index), framework="pt") as f:
            return json.loads(f.metadata()["stats"])

    def layer_tensor_handle(self, index: int):
        """A lazily-read handle (memory-mapped) for streaming into the final checkpoint."""
        return safe_open(self.layer_path(index), framework="pt")

    def finish(self) -> None:
        """Move the assembled checkpoint into place and drop the partial directory.

        Everything is fsynced first, and an old output is renamed aside (not deleted)
        before the new one is renamed in, so a crash never leaves a truncated checkpoint
        that looks complete, nor a moment with neither.
        """
        fsync_tree(self.final_dir)
        old = None
        if os.path.exists(self.out_dir):
            old = self.path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out_dir, old)
        os.replace(self.final_dir, self.out_dir)
        fsync_dir(os.path.dirname(self.out_dir))
        shutil.rmtree(self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
