"""The partial output of a quantization run: settings, and one file per finished layer.

Layout of `<out>.partial/`:
  settings.json            what produced these results (compared on --resume)
  layers/layer_0007.safetensors   packed tensors of each Linear of layer 7, stats in metadata
A layer file appears only once it is complete (written to a temporary name, fsynced,
renamed), so after a kill -9 every file present is whole. The final checkpoint is
assembled in `<out>.partial/final/` and renamed to `<out>` as the last step.

Nothing is deleted that this tool did not write (outputs.py: the source model and
--overwrite), and a `<out>.partial` is removed only when it holds this layout and nothing
else. A failed write (read-only directory, disk full) is one OutputError saying what to
do; finished layer files are kept for --resume.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import follow_umask, fsync_dir, fsync_tree, write_json
from .outputs import OutputError, check_not_source, check_replaceable, writing

log = logging.getLogger(__name__)


SETTINGS_FILE = "settings.json"
# What a partial run holds: settings.json, layers/, final/, and write_json's temporaries.
PARTIAL_ENTRIES = {SETTINGS_FILE, "layers", "final"}
LAYER_FILE = re.compile(r"layer_\d{4}\.safetensors(\.tmp)?$")


class ResumeError(ValueError):
    """A partial run cannot be continued with these settings."""


class WorkDir:
    def __init__(self, out_dir: str):
        self.out_dir = os.path.abspath(out_dir)
        self.path = self.out_dir + ".partial"
        self.layers_dir = os.path.join(self.path, "layers")
        self.final_dir = os.path.join(self.path, "final")

    def exists(self) -> bool:
        return os.path.lexists(self.path)

    def check_source(self, source: str) -> None:
        """Refuse an output (or partial directory) that is, is inside, or contains the source model."""
        check_not_source(source, self.out_dir, self.path)

    def start(self, settings: dict, resume: bool, overwrite: bool) -> int:
        """Prepare the directory; returns how many leading layers are already done."""
        if os.path.lexists(self.out_dir):
            if not overwrite:
                raise FileExistsError(f"{self.out_dir} already exists; pass --overwrite to replace it, or choose another --out")
            check_replaceable(self.out_dir)
        if self.exists():
            self._check_ours()
            if not resume and not overwrite:
                raise FileExistsError(
                    f"a partial run exists at {self.path}; pass --resume to continue it or --overwrite to start over"
                )
            if resume:
                self._check_settings(settings)
        elif resume:
            log.info("--resume: no partial run at %s, starting from the first layer", self.path)
        with writing(self.path):
            if self.exists() and not resume:
                shutil.rmtree(self.path)
            if not self.exists():
                # settings.json first: a partial directory without it is not ours (see _foreign)
                os.makedirs(self.path)
                write_json(os.path.join(self.path, SETTINGS_FILE), settings)
            os.makedirs(self.layers_dir, exist_ok=True)
            shutil.rmtree(self.final_dir, ignore_errors=True)
        return self.done_layers()

    def _check_ours(self) -> None:
        """A partial directory is deleted (--overwrite, or after finishing) only if it has our layout."""
        problem = self._foreign()
        if problem:
            raise OutputError(
                f"{self.path} was not made by bluelm-quant ({problem}), so it is left alone; move it away "
                "or choose another --out"
            )

    def _foreign(self) -> str | None:
        """Why the partial directory is not one this tool wrote, or None."""
        entries = set(os.listdir(self.path)) if os.path.isdir(self.path) else None
        problem = None
        if entries is None:
            problem = "it is not a directory"
        else:
            foreign = sorted(e for e in entries - PARTIAL_ENTRIES if not e.startswith(".tmp-"))
            layers = os.listdir(self.layers_dir) if os.path.isdir(self.layers_dir) else []
            foreign += sorted(f"layers/{f}" for f in layers if not LAYER_FILE.match(f))
            if foreign:
                problem = f"it holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}"
            elif entries and SETTINGS_FILE not in entries:
                problem = f"it has no {SETTINGS_FILE}"
        return problem

    def _check_settings(self, settings: dict) -> None:
        path = os.path.join(self.path, SETTINGS_FILE)
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
        with writing(self.path):
            try:
                save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata={"stats": json.dumps(stats)})
                follow_umask(tmp)
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)  # half a file helps nobody; it would only hold the space
                raise
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
        with writing(self.out_dir):
            fsync_tree(self.final_dir)
            old = None
            if os.path.lexists(self.out_dir):
                check_replaceable(self.out_dir)  # checked at start; the directory may have changed since
                parent = os.path.dirname(self.out_dir)
                old = tempfile.mkdtemp(prefix=f".old-{os.path.basename(self.out_dir)}-", dir=parent)
                os.rmdir(old)  # a fresh name that nothing else uses
                os.replace(self.out_dir, old)
            os.replace(self.final_dir, self.out_dir)
            fsync_dir(os.path.dirname(self.out_dir))
        problem = self._foreign()
        if problem:  # something was added during the run: the checkpoint is published, keep the rest
            log.warning("%s is left in place: %s", self.path, problem)
        else:
            shutil.rmtree(self.path, ignore_errors=True)
        if old:
            shutil.rmtree(old, ignore_errors=True)
