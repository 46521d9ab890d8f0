"""Read the embedding row count from a checkpoint without loading its tensors.

BlueLM configs say vocab_size 100096 while the 2K chat checkpoint's tensors reportedly have
100008 rows (BLUELM.md section 1, [inferred]). Whoever builds a model skeleton from config.json
must size embed_tokens / lm_head from the tensors instead: `BlueLMForCausalLM.from_pretrained`
does it through this helper, and so should any other loader.
"""
from __future__ import annotations

import json
import os

import torch

EMBED_KEY = "model.embed_tokens.weight"
# lm_head stays unquantized in every known BlueLM checkpoint; qweight is [K/8, N] if one ever is.
LM_HEAD_KEYS = (("lm_head.weight", 0), ("lm_head.qweight", 1))


class CheckpointVocabError(ValueError):
    """The checkpoint's embedding and output layer disagree on the vocabulary size."""


def _index(path: str, index_name: str) -> dict[str, str] | None:
    index_file = os.path.join(path, index_name)
    if not os.path.isfile(index_file):
        return None
    with open(index_file, encoding="utf-8") as f:
        return json.load(f)["weight_map"]


def _safetensors_shapes(files: dict[str, list[str]]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    shapes = {}
    for file, keys in files.items():
        with safe_open(file, framework="pt") as f:  # reads the JSON header only
            for key in keys:
                if key in f.keys():
                    shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def _torch_bin_shapes(files: dict[str, list[str]]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file, keys in files.items():
        # mmap: the storages are mapped, not read, so a 5 GB shard costs no memory here.
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        shapes.update({k: tuple(state[k].shape) for k in keys if k in state})
        del state
    return shapes


def _wanted_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    wanted = [EMBED_KEY] + [k for k, _ in LM_HEAD_KEYS]
    for single, index_name, reader in (
        ("model.safetensors", "model.safetensors.index.json", _safetensors_shapes),
        ("pytorch_model.bin", "pytorch_model.bin.index.json", _torch_bin_shapes),
    ):
        weight_map = _index(path, index_name)
        if weight_map is not None:
            files: dict[str, list[str]] = {}
            for key in wanted:
                if key in weight_map:
                    files.setdefault(os.path.join(path, weight_map[key]), []).append(key)
            return reader(files)
        if os.path.isfile(os.path.join(path, single)):
            return reader({os.path.join(path, single): wanted})
    return None


def bluelm_vocab_rows_from_checkpoint(path: str | os.PathLike) -> int | None:
    """Number of rows of `model.embed_tokens.weight` in a local checkpoint directory.

    Returns None when `path` is not a local directory with a known weights layout
    (model.safetensors[.index.json] or pytorch_model.bin[.index.json]) or when the embedding is
    absent. Raises CheckpointVocabError if lm_head has a different number of rows.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return None
    shapes = _wanted_shapes(path)
    if not shapes or EMBED_KEY not in shapes:
        return None
    rows = shapes[EMBED_KEY][0]
    for key, dim in LM_HEAD_KEYS:
        if key in shapes and shapes[key][dim] != rows:
            raise CheckpointVocabError(
                f"{path}: {EMBED_KEY} has {rows} rows but {key} has shape {shapes[key]}; "
                "the checkpoint is inconsistent, re-export it"
            )
    return rows


__all__ = ["bluelm_vocab_rows_from_checkpoint", "CheckpointVocabError"]
