"""Read a Hugging Face weight directory tensor by tensor, without loading it whole.

Handles sharded or single safetensors (memory-mapped) and sharded or single
PyTorch `.bin` files (read only with `torch.load(weights_only=True, mmap=True)`).
Every failure names the file and says what to do.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import zipfile
from collections import defaultdict
from typing import Iterator

import torch
from safetensors import SafetensorError, safe_open

INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# safetensors tensors are zero-copy views of a private memory map of their whole file:
# every page touched stays resident (and counts in the RSS) while any view from that map
# lives. Tensors the model keeps as they are (CPU, same dtype) come from one long-lived map
# per file, so only what a forward pass touches is resident. Tensors that are converted or
# moved to a device are read through separate maps, replaced after this many bytes, so the
# pages touched while converting are released with them.
DEFAULT_REMAP_BYTES = 256 * 1024**2
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not fit the model."""


class ShardReader:
    """Maps tensor names to files; loads one file's tensors at a time."""

    def __init__(self, directory: str, remap_bytes: int = DEFAULT_REMAP_BYTES):
        self.directory = directory
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory} is not a directory")
        self._open: dict[str, object] = {}
        self._transient: dict[str, object] = {}
        self.remap_bytes = remap_bytes
        self._read_since_open: dict[str, int] = defaultdict(int)
        self._headers: dict[str, dict] = {}
        self._data_start: dict[str, int] = {}  # safetensors: where a file's tensor bytes begin
        self.key_to_file = self._discover()

    def _discover(self) -> dict[str, str]:
        d = self.directory
        for index in INDEX_FILES:
            path = os.path.join(d, index)
            if os.path.exists(path):
                try:
                    with open(path, encoding="utf-8") as f:
                        weight_map = json.load(f)["weight_map"]
                except (json.JSONDecodeError, KeyError) as e:
                    raise CheckpointError(f"{path} is not a valid index file (no weight_map): {e}") from None
                missing = sorted({v for v in weight_map.values() if not os.path.exists(os.path.join(d, v))})
                if missing:
                    raise CheckpointError(
                        f"{path} names shard(s) that are not in {d}: {', '.join(missing)}; "
                        "the download is incomplete - fetch the missing files"
                    )
                return dict(weight_map)
        for single in SINGLE_FILES:
            if os.path.exists(os.path.join(d, single)):
                return {k: single for k in self._file_keys(single)}
        found = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
        if found:
            mapping = {}
            for f in found:
                mapping.update({k: f for k in self._file_keys(f)})
            return mapping
        raise CheckpointError(
            f"no weights in {d}: expected model.safetensors(.index.json), "
            "pytorch_model.bin(.index.json) or *.safetensors files"
        )

    # --- low level --------------------------------------------------------------------

    def _path(self, file: str) -> str:
        return os.path.join(self.directory, file)

    def _handle(self, file: str, transient: bool = False):
        if transient and file.endswith(".safetensors"):
            if file not in self._transient:
                self._transient[file] = self._open_safetensors(file)
            return self._transient[file]
        if file not in self._open:
            path = self._path(file)
            self._open[file] = self._open_safetensors(file) if file.endswith(".safetensors") else _load_bin(path)
        return self._open[file]

    def _open_safetensors(self, file: str):
        path = self._path(file)
        try:
            return safe_open(path, framework="pt", device="cpu")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(
                f"cannot read {path}: {e}. The file is truncated or corrupt; re-download or re-create it"
            ) from None

    def _file_keys(self, file: str) -> list[str]:
        if file.endswith(".safetensors"):
            return list(self._header(file))
        return list(self._handle(file).keys())

    def _header(self, file: str) -> dict:
        """A safetensors file's header ({name: {"dtype", "shape", ...}}), read without mapping
        the file: shape and dtype queries must not keep a shard's pages mapped."""
        if file not in self._headers:
            path = self._path(file)
            try:
                with open(path, "rb") as f:
                    (size,) = struct.unpack("<Q", f.read(8))
                    if size > os.path.getsize(path) - 8:
                        raise ValueError(f"header length {size} exceeds the file")
                    header = json.loads(f.read(size))
                if not isinstance(header, dict):
                    raise ValueError("the header is not a JSON object")
            except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(
                    f"cannot read {path}: {e}. The file is truncated or corrupt; re-download or re-create it"
                ) from None
            header.pop("__metadata__", None)
            self._headers[file] = header
            self._data_start[file] = 8 + size
        return self._headers[file]

    def _entry(self, key: str) -> tuple[str, dict | None]:
        file = self.key_to_file.get(key)
        if file is None:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint at {self.directory}")
        if not file.endswith(".safetensors"):
            return file, None
        entry = self._header(file).get(key)
        if not isinstance(entry, dict):
            raise CheckpointError(
                f"tensor {key!r} is not in {self._path(file)}; the index and the shard disagree or the file is corrupt"
            )
        return file, entry

    # --- public -----------------------------------------------------------------------

    def keys(self) -> list[str]:
        return list(self.key_to_file)

    def files(self) -> list[str]:
        """Files in a stable order, each with the keys it holds."""
        return sorted(set(self.key_to_file.values()))

    def keys_by_file(self) -> dict[str, list[str]]:
        by_file = defaultdict(list)
        for k, f in self.key_to_file.items():
            by_file[f].append(k)
        return dict(sorted(by_file.items()))

    def __contains__(self, key: str) -> bool:
        return key in self.key_to_file

    def get(self, key: str, transient: bool = False) -> torch.Tensor:
        """The tensor on CPU, a view of the file's memory map where the format allows.

        transient: the caller converts or moves it and drops it (see DEFAULT_REMAP_BYTES);
        .bin files have one map per file either way.
        """
        if key not in self.key_to_file:
            raise CheckpointError(f"tensor {key!r} is not in the checkpoint at {self.directory}")
        file = self.key_to_file[key]
        h = self._handle(file, transient)
        try:
            t = h.get_tensor(key) if file.endswith(".safetensors") else h[key]
        except (SafetensorError, KeyError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot read tensor {key!r} from {self._path(file)}: {e}. "
                "The index and the shard disagree or the file is corrupt"
            ) from None
        if transient and file.endswith(".safetensors"):
            self._read_since_open[file] += t.numel() * t.element_size()
            if self._read_since_open[file] >= self.remap_bytes:
                self._transient.pop(file, None)  # the map goes once the views read from it are dropped
                self._read_since_open.pop(file, None)
        return t

    def scan(self, key: str, chunk_bytes: int = 64 * 1024**2) -> Iterator[torch.Tensor]:
        """The tensor's values as consecutive flat pieces of at most `chunk_bytes`.

        For one pass over a large tensor (a check of its values): safetensors files are read
        with plain reads, not a memory map, so no page of the file stays resident in this
        process; memory stays at one piece however large the tensor.
        """
        file, entry = self._entry(key)
        if entry is None:  # .bin: torch.load's memory map; released with the file's handle
            flat = self.get(key).reshape(-1)
            step = max(1, chunk_bytes // flat.element_size())
            for start in range(0, flat.numel(), step):
                yield flat[start:start + step]
            return
        dtype = self.dtype(key)
        itemsize = torch.empty(0, dtype=dtype).element_size()
        begin, end = entry.get("data_offsets", (0, 0))
        step = max(1, chunk_bytes // itemsize) * itemsize
        path = self._path(file)
        with open(path, "rb") as f:
            f.seek(self._data_start[file] + begin)
            for offset in range(begin, end, step):
                piece = bytearray(min(step, end - offset))
                if f.readinto(piece) != len(piece):
                    raise CheckpointError(
                        f"cannot read tensor {key!r} from {path}: the file ends early. "
                        "The file is truncated or corrupt; re-download or re-create it"
                    )
                yield torch.frombuffer(piece, dtype=dtype)

    def dtype(self, key: str) -> torch.dtype:
        """Stored dtype of a tensor, from the header (nothing is read)."""
        file, entry = self._entry(key)
        if entry is None:
            return self._handle(file)[key].dtype
        name = entry.get("dtype")
        if name not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {key!r} in {self._path(file)} has dtype {name}, which no model layer uses")
        return SAFETENSORS_DTYPES[name]

    def shape(self, key: str) -> tuple[int, ...]:
        """Stored shape of a tensor, from the header (nothing is read)."""
        file, entry = self._entry(key)
        if entry is None:
            return tuple(self._handle(file)[key].shape)
        return tuple(entry.get("shape", ()))

    def release(self, file: str) -> None:
        """Drop a file's handle so its pages can be reclaimed (shard-by-shard loading)."""
        self._open.pop(file, None)
        self._transient.pop(file, None)
        self._read_since_open.pop(file, None)

    def close(self) -> None:
        self._open.clear()
        self._transient.clear()
        self._read_since_open.clear()


def _load_bin(path: str) -> dict[str, torch.Tensor]:
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (pre-zip) pickles cannot be memory-mapped; still weights_only.
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, OSError) as e:
        raise CheckpointError(
            f"cannot read {path} as a PyTorch weight file ({type(e).__name__}: {str(e)[:200]}). "
            "It is truncated or corrupt, or holds more than tensors (only weights_only files are read)"
        ) from None
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return obj
