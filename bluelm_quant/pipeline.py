"""Layer-by-layer GPTQ over a whole model, with bounded memory and resume.

Data flows one way:
  token windows -> first layer's inputs -> for each decoder layer: load its weights
  from the source shards -> per Linear group (forward order): accumulate the Hessian
  of the group's input, GPTQ each Linear, write the dequantized weight back -> run the
  quantized layer to get the next layer's inputs -> save the packed layer, drop its
  weights -> stream everything into the final checkpoint.

Only one decoder layer's full-precision weights are in memory at a time (the model
skeleton's parameters live on the meta device). Activations stay on the CPU; a layer
runs on `device`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import ops
from .capture import StopForward, capture_first_layer_inputs, run_layer
from .checkpoint import DEFAULT_MAX_SHARD, assign_tensor, tied_keys, build_skeleton, copy_model_files, write_configs, write_shards
from .config import QuantConfig, QuantConfigError
from .gptq import GPTQ, GPTQError, all_finite
from .memo import TailMemo
from .models import ModelSpec, UnsupportedModelError, spec_for
from .packing import gptq_tensors, pack_multiple
from .placement import resolve_device
from .report import write_report
from .shards import CheckpointError, ShardReader
from .workdir import WorkDir

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 4096  # windows per forward batch = this / seqlen: big enough matmuls, small attention
# Measured on a 2-core EPYC: solving a 576-input layer takes 0.14 s on 1 thread and 0.75 s
# on 2; at 1536 inputs 2 threads win slightly when the machine is idle (0.29 s vs 0.41 s)
# but lose 4-15x as soon as another process holds a core. One thread up to this K; 7B
# layers (K = 4096, 11008) are dominated by large matmuls and factorizations that need
# both cores.
SOLVER_ONE_THREAD_MAX_K = 2048
# Recorded tail inputs (memo.py) per layer: SmolLM2 with 128 x 512 windows needs 0.3 GB;
# a 7B with 128 x 2048 would need 7.9 GB, so there only what fits is memoized.
MEMO_MAX_BYTES = 2 << 30


class NonFiniteActivationError(RuntimeError):
    """A layer produced NaN or Inf."""


@dataclass
class RunOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = None  # layer forward dtype; None: see _compute_dtype
    resume: bool = False
    overwrite: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD
    progress: bool = True
    settings: dict = field(default_factory=dict)  # calibration description, compared on resume


def _source_dtype(reader: ShardReader, spec: ModelSpec) -> torch.dtype:
    for key in reader.keys():
        if key.startswith(spec.layers + ".") and key.endswith(".weight"):
            return reader.dtype(key)
    raise CheckpointError(f"no decoder-layer weights under {spec.layers!r} in {reader.directory}")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run ~2.4x faster than fp32 (measured here)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def _compute_dtype(opts: RunOptions, source: torch.dtype) -> torch.dtype:
    """Layer forward dtype. Hessians are always accumulated in fp32."""
    if opts.dtype is not None:
        return opts.dtype
    if torch.device(opts.device).type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return source if source in (torch.float16, torch.bfloat16) else torch.float16


def load_module(module: nn.Module, prefix: str, reader: ShardReader, device, dtype) -> None:
    """Materialize a module's parameters and persistent buffers from the source shards."""
    persistent = {n for n, _ in module.named_buffers()} - {
        f"{m}.{b}".lstrip(".") for m, sub in module.named_modules() for b in sub._non_persistent_buffers_set
    }
    names = [n for n, _ in module.named_parameters()] + sorted(persistent)
    for name in names:
        key = f"{prefix}.{name}" if prefix else name
        if key not in reader:
            raise CheckpointError(f"tensor {key} is missing from {reader.directory}")
        t = read_copy(reader, key, device, dtype)
        want = tuple(module.get_parameter(name).shape if name in dict(module.named_parameters()) else module.get_buffer(name).shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {key} has shape {list(t.shape)}, the model expects {list(want)}")
        assign_tensor(module, name, t)


def read_copy(reader: ShardReader, key: str, device="cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """A source tensor as an owned copy (floats converted to `dtype` if given); its shard
    is unmapped after the read.

    copy=True: a same-dtype .to() would alias the shard's memory map, and writing the
    quantized weight back would turn those pages into private memory that outlives the
    layer (13 GB by the last layer of a 7B model). Unmapping: a map kept open holds the
    pages read through it (90 MB per 7B layer; 2.8 GB of RSS by the last layer).
    """
    t = reader.get(key, transient=True)
    reader.release(reader.key_to_file[key])  # the map goes once `t` does
    return t.to(device, dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)


def write_back(linear: nn.Linear, tensors: dict[str, torch.Tensor], bits: int) -> None:
    """Replace a Linear's weight by its dequantized value (what later layers must see).

    Used both after GPTQ and on resume, so that both paths feed the next layer
    bit-identical weights.
    """
    w = ops.dequantize_reference(
        tensors["qweight"].to(linear.weight.device), tensors["qzeros"].to(linear.weight.device),
        tensors["scales"].to(linear.weight.device), tensors["g_idx"].to(linear.weight.device), bits, torch.float32,
    )
    linear.weight.data.copy_(w.T.to(linear.weight.dtype))


def quantize_layer(layer, hidden, kwargs, spec: ModelSpec, config: QuantConfig, device, batch: int, name: str, out=None, source=None):
    """GPTQ every Linear of one decoder layer; returns (tensors by 'linear.suffix', stats).

    With `out`, the quantized layer's outputs for all windows are written there too (it
    may be `hidden` itself). `source(linear_name)` gives a Linear's weight as the
    checkpoint stores it, which GPTQ should match; without it, the layer's own weight
    (in the forward dtype: bf16 on a CPU would round an fp16/fp32 checkpoint first).
    """
    groups = spec.sequential if config.true_sequential else (tuple(n for g in spec.sequential for n in g),)
    # A recorded tail input is replayable only if every Linear before the tail was final
    # when it was recorded: true-sequential guarantees it, one pass for all groups does not.
    memos = _tail_memos(layer, spec, hidden, name) if config.true_sequential else {}
    tensors, stats = {}, {}
    try:
        for group in groups:
            _collect_and_quantize(layer, hidden, kwargs, spec, config, device, batch, name, group, memos, tensors, stats, source)
        if out is not None:
            run_layer(layer, hidden, kwargs, device, batch, out=out)
    finally:
        for memo in memos.values():
            memo.remove()
    return tensors, stats


def _tail_memos(layer, spec: ModelSpec, hidden: torch.Tensor, name: str) -> dict[str, TailMemo]:
    """TailMemos by tail Linear name, in forward order, while they fit MEMO_MAX_BYTES."""
    memos, total = {}, 0
    for module, tail in spec.tails:
        linear = layer.get_submodule(tail)
        size = hidden.shape[0] * hidden.shape[1] * linear.in_features * hidden.element_size()
        if total + size > MEMO_MAX_BYTES:
            break
        memos[tail] = TailMemo(layer.get_submodule(module), linear, hidden.shape[0], f"{name}.{module}")
        total += size
    return memos


def _collect_and_quantize(layer, hidden, kwargs, spec, config, device, batch, name, group, memos, tensors, stats, source) -> None:
    """One pass over the windows for a group's Hessians, then GPTQ its Linears."""
    # Linears of a spec group read the same input, so one Hessian serves them all.
    firsts = [g[0] for g in spec.sequential if g[0] in group]
    solvers = {n: GPTQ(layer.get_submodule(n).in_features, device=device) for n in firsts}
    recording = {g[0]: [memos[m] for m in g if m in memos] for g in spec.sequential if g[0] in solvers}
    hooks = []
    for n in firsts:
        def collect(_module, inputs, n=n):
            try:
                solvers[n].add_batch(inputs[0])
            except GPTQError as e:  # e.g. NaN/Inf activations: say which layer
                raise NonFiniteActivationError(f"{name}.{n}: {e}") from None
            for memo in recording[n]:
                memo.record(inputs[0])
            if config.true_sequential:
                raise StopForward  # the rest of the layer is not needed for this group

        hooks.append(layer.get_submodule(n).register_forward_pre_hook(collect))
    try:
        run_layer(layer, hidden, kwargs, device, batch, stop=config.true_sequential)
    finally:
        for h in hooks:
            h.remove()
    for sub in spec.sequential:
        if sub[0] in solvers:
            _quantize_group(layer, name, sub, solvers[sub[0]], config, tensors, stats, source)
            solvers[sub[0]].free()
            for memo in recording[sub[0]]:
                memo.install()  # its tail is final now: later passes replay it


def _quantize_group(layer, layer_name: str, names, solver: GPTQ, config: QuantConfig, tensors: dict, stats: dict, source=None) -> None:
    """GPTQ the Linears that share one Hessian as one stacked weight, then split.

    GPTQ treats output rows independently given H, so stacking q/k/v (or gate/up) is
    exact and runs the column loop once instead of once per Linear.
    """
    linears = [layer.get_submodule(n) for n in names]
    weight = torch.cat([source(n) if source else lin.weight.data for n, lin in zip(names, linears)])
    # Small factorizations and the column loop are latency-bound: a second thread only
    # adds synchronization (and stalls badly when another process holds the other core).
    threads = 1 if weight.device.type == "cpu" and weight.shape[1] <= SOLVER_ONE_THREAD_MAX_K else None
    with _torch_threads(threads):
        try:
            result = solver.quantize(weight, config, keep_hessian=False)  # used once
        except GPTQError as e:
            raise GPTQError(f"{layer_name}.{'/'.join(names)}: {e}") from None
    start = 0
    for n, linear in zip(names, linears):
        stop = start + linear.out_features
        t = gptq_tensors(result.quantized.rows(start, stop))
        if linear.bias is not None:
            t["bias"] = linear.bias.detach().to("cpu", torch.float16)
        write_back(linear, t, config.bits)
        tensors.update({f"{n}.{k}": v.cpu() for k, v in t.items()})
        stats[n] = {
            "loss": float(result.row_loss[start:stop].sum()),
            "damp": float(result.damp),
            "seconds": float(result.seconds) * (stop - start) / weight.shape[0],
        }
        start = stop


@contextlib.contextmanager
def _torch_threads(n: int | None):
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def preflight(model_dir: str) -> tuple[ShardReader, ModelSpec]:
    """The checks that need no model: a config, a known family, weights."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{model_dir} has no config.json; --model must be a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    spec = spec_for(SimpleNamespace(model_type=raw.get("model_type"), architectures=raw.get("architectures")))
    return ShardReader(model_dir), spec


def check_spec(model, spec: ModelSpec, config: QuantConfig) -> None:
    """Every Linear the spec names exists in each layer and packs at this bit width."""
    layers = model.get_submodule(spec.layers)
    for i, layer in enumerate(layers):
        for n in (n for g in spec.sequential for n in g):
            try:
                linear = layer.get_submodule(n)
            except AttributeError:
                raise UnsupportedModelError(
                    f"{spec.layers}.{i} has no module {n!r}: the {spec.name!r} model-family spec does not fit "
                    f"this {type(model).__name__}; add a ModelSpec for it in bluelm_quant/models/__init__.py"
                ) from None
            multiple = pack_multiple(config.bits)
            if linear.in_features % multiple or linear.out_features % multiple:
                raise QuantConfigError(
                    f"{spec.layers}.{i}.{n} is [{linear.out_features}, {linear.in_features}]: {config.bits}-bit "
                    f"packing needs both dimensions to be multiples of {multiple}"
                )


def _windows_digest(windows: torch.Tensor) -> str:
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def quantize_model(model_dir: str, out_dir: str, config: QuantConfig, windows: torch.Tensor, opts: RunOptions) -> dict:
    """Quantize the full-precision model in `model_dir` into a GPTQ checkpoint at `out_dir`."""
    if config.checkpoint_format != "gptq" or config.lm_head:
        raise QuantConfigError(
            "bluelm-quant writes checkpoint_format='gptq' (v1 zeros) with an unquantized lm_head, what "
            f"AutoGPTQ, GPTQModel and vLLM read; got checkpoint_format={config.checkpoint_format!r}, lm_head={config.lm_head}"
        )
    device = resolve_device(opts.device)
    reader, spec = preflight(model_dir)
    model = build_skeleton(model_dir, torch.float32, reader)
    check_spec(model, spec, config)
    vocab = model.get_input_embeddings().num_embeddings
    if windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
        raise ValueError(
            f"calibration token ids span [{int(windows.min())}, {int(windows.max())}] but the model has "
            f"vocab_size={vocab}; the tokenizer does not belong to this model"
        )
    layers: nn.ModuleList = model.get_submodule(spec.layers)
    source_dtype = _source_dtype(reader, spec)
    dtype = _compute_dtype(opts, source_dtype)
    batch = max(1, TOKENS_PER_BATCH // windows.shape[1])
    settings = {
        **config.to_dict(),
        "model": os.path.abspath(model_dir),
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "windows_sha256": _windows_digest(windows),
        "compute_dtype": str(dtype),
        "device_type": device.type,
        **opts.settings,
    }
    work = WorkDir(out_dir)
    done = work.start(settings, opts.resume, opts.overwrite)
    if done:
        log.info("resuming: %d of %d layers already quantized in %s", done, len(layers), work.path)
    per_layer = []
    if done < len(layers):
        per_layer = _run_layers(model, layers, spec, reader, config, windows, work, done, device, dtype, batch, opts)
    else:
        per_layer = [work.load_stats(i) for i in range(len(layers))]
    _assemble(model, layers, spec, reader, config, work, opts)
    report = write_report(work.final_dir, per_layer, settings)
    work.finish()
    return report


def _run_layers(model, layers, spec, reader, config, windows, work, done, device, dtype, batch, opts):
    for name in spec.before:
        if _has_module(model, name):
            load_module(model.get_submodule(name), name, reader, device, dtype)
    hidden, kwargs = capture_first_layer_inputs(model, layers, windows, device, dtype, batch)
    for name in spec.before:
        if _has_module(model, name):
            model.get_submodule(name).to("meta")  # the embedding is no longer needed
    per_layer = []
    bar = tqdm(range(len(layers)), desc="quantizing", unit="layer", disable=not opts.progress)
    for i in bar:
        layer, prefix = layers[i], f"{spec.layers}.{i}"
        load_module(layer, prefix, reader, device, dtype)
        start = time.perf_counter()
        last = i + 1 == len(layers)  # its outputs feed nothing
        if i < done:
            tensors, stats = work.load_layer(i)
            for n in (n for g in spec.sequential for n in g):
                write_back(layer.get_submodule(n), {k.split(".")[-1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == n}, config.bits)
            if not last:
                run_layer(layer, hidden, kwargs, device, batch, out=hidden)
        else:
            tensors, linear_stats = quantize_layer(
                layer, hidden, kwargs, spec, config, device, batch, prefix, out=None if last else hidden,
                source=lambda n, prefix=prefix: read_copy(reader, f"{prefix}.{n}.weight"),
            )
            stats = {"layer": i, "linears": linear_stats, "seconds": time.perf_counter() - start, **_sizes(layer, tensors, spec)}
            work.save_layer(i, tensors, stats)
            bar.set_postfix_str(" ".join(f"{n.split('.')[-1]}={s['loss']:.3g}" for n, s in linear_stats.items()))
        if not last and not all_finite(hidden):
            raise NonFiniteActivationError(
                f"{prefix} produced NaN/Inf activations; try --dtype float32, a larger --damp, or check the source weights"
            )
        layer.to("meta")
        per_layer.append(stats)
    return per_layer


def _has_module(model, name) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _sizes(layer, tensors, spec) -> dict:
    names = [n for g in spec.sequential for n in g]
    before = sum(layer.get_submodule(n).weight.numel() * 2 for n in names)  # vs 16-bit weights
    after = sum(t.numel() * t.element_size() for t in tensors.values())
    return {"bytes_fp16": before, "bytes_quantized": after}


def _assemble(model, layers, spec, reader, config, work, opts) -> None:
    """Stream source tensors and packed layers into the final checkpoint directory."""
    os.makedirs(work.final_dir)
    quantized = {f"{spec.layers}.{i}.{n}" for i in range(len(layers)) for g in spec.sequential for n in g}
    tied = tied_keys(model)
    handles = {}

    def items():
        for key in model.state_dict(keep_vars=True):
            module = key.rsplit(".", 1)[0]
            if module in quantized:
                if not key.endswith(".weight"):
                    continue  # a bias travels with the packed tensors
                i = int(module[len(spec.layers) + 1 :].split(".")[0])
                if i not in handles:
                    handles.clear()  # layers come in order: the previous file is done
                    handles[i] = work.layer_tensor_handle(i)
                h = handles[i]
                local = module[len(f"{spec.layers}.{i}.") :]
                for k in sorted(h.keys()):
                    if k.rsplit(".", 1)[0] == local:
                        yield f"{module}.{k.rsplit('.', 1)[1]}", h.get_tensor(k)
            elif key in reader:
                yield key, reader.get(key)
            elif key not in tied:
                raise CheckpointError(f"tensor {key} is missing from {reader.directory}")

    write_shards(items(), work.final_dir, opts.max_shard_size)
    copy_model_files(reader.directory, work.final_dir)
    with open(os.path.join(reader.directory, "config.json"), encoding="utf-8") as f:
        hf = json.load(f)  # the source's own config (dtype, auto_map...), not the skeleton's
    hf.pop("quantization_config", None)
    write_configs(work.final_dir, hf, config)


def quantize(
    model_dir: str,
    out_dir: str,
    config: QuantConfig,
    calib: list | None = None,
    nsamples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    opts: RunOptions | None = None,
) -> dict:
    """Tokenize calibration text with the model's tokenizer, then `quantize_model`.

    calib: paths or data.Source objects; None = the bundled English + Chinese texts.
    """
    from transformers import AutoTokenizer

    from . import models  # noqa: F401  (BlueLM's tokenizer registration)
    from .data import calibration_windows

    resolve_device((opts or RunOptions()).device)  # bad input fails here, not after tokenizing
    preflight(model_dir)
    opts = opts or RunOptions()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenizer, calib, nsamples=nsamples, seqlen=seqlen, seed=seed)
    opts.settings = {**opts.settings, "calib": [str(getattr(c, "path", c)) for c in calib] if calib else "bundled", "seed": seed}
    return quantize_model(model_dir, out_dir, config, windows, opts)
