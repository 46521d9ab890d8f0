"""Layer-by-layer GPTQ over a whole model, with bounded memory and resume.

Data flows one way (docs/ARCHITECTURE.md):
  token windows -> the first layer's inputs (capture.py) -> for each decoder layer: load its
  weights from the source shards -> LayerJob.quantize (layer_job.py: per Linear group in
  forward order, the Hessian of its input, GPTQ, write back) -> save the packed layer
  (workdir.py) -> LayerJob.propagate: the quantized layer's outputs are the next layer's
  inputs -> assemble the final checkpoint (assemble.py).

Only one decoder layer's full-precision weights are in memory at a time (the model
skeleton's parameters live on the meta device). Activations stay on the CPU; a layer
runs on `device`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .assemble import assemble_checkpoint, check_copied_tensors
from .auto import register_auto_classes
from .capture import capture_first_layer_inputs
from .config import QuantConfig, QuantConfigError
from .gptq import all_finite
from .hardware import cpu_has_native_bf16
from .layer_job import LayerJob, LayerResult, LayerRun, NonFiniteActivationError
from .lock import output_lock
from .modeldir import ModelDir
from .models import ModelSpec, UnsupportedModelError, spec_for
from .outputs import writing
from .packing import pack_multiple
from .placement import resolve_device
from .report import write_report
from .saving import DEFAULT_MAX_SHARD
from .shards import CheckpointError
from .skeleton import build_skeleton, materialize, read_copy
from .workdir import WorkDir

log = logging.getLogger(__name__)

TOKENS_PER_BATCH = 4096  # windows per forward batch = this / seqlen: big enough matmuls, small attention


@dataclass
class RunOptions:
    device: str = "cpu"
    dtype: torch.dtype | None = None  # layer forward dtype; None: see compute_dtype
    resume: bool = False
    overwrite: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD
    progress: bool = True
    settings: dict = field(default_factory=dict)  # calibration description, compared on resume


@dataclass
class Calibration:
    """What to calibrate on: text sources cut into `nsamples` seeded windows of `seqlen` tokens."""

    sources: list | None = None  # paths or data.Source objects; None: the bundled English + Chinese text
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0

    def describe(self) -> dict:
        """What a resumed run must match (besides the windows' digest)."""
        sources = [str(getattr(s, "path", s)) for s in self.sources] if self.sources else "bundled"
        return {"calib": sources, "seed": self.seed}


def compute_dtype(opts: RunOptions, source: torch.dtype) -> torch.dtype:
    """Layer forward dtype. Hessians are always accumulated in fp32."""
    if opts.dtype is not None:
        return opts.dtype
    if torch.device(opts.device).type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return source if source in (torch.float16, torch.bfloat16) else torch.float16


def source_dtype(model_dir: ModelDir, spec: ModelSpec) -> torch.dtype:
    """The stored dtype of the decoder layers' weights (from a shard header)."""
    reader = model_dir.reader
    for key in reader.keys():
        if key.startswith(spec.layers + ".") and key.endswith(".weight"):
            return reader.dtype(key)
    raise CheckpointError(f"no decoder-layer weights under {spec.layers!r} in {model_dir.path}")


def preflight(model_dir: str) -> tuple[ModelDir, ModelSpec]:
    """The checks that need no model: a config, a known family, weights."""
    source = ModelDir(model_dir)
    spec = spec_for(source)
    source.reader  # noqa: B018  (opens the weight files: a directory without weights fails here)
    return source, spec


def linear_in_features(source: ModelDir, spec: ModelSpec) -> list[int]:
    """The input width of every Linear the run quantizes, from the shard headers (no weights read)."""
    layers = int(source.config.get("num_hidden_layers", 0))
    return [source.reader.shape(f"{spec.layer_name(i)}.{n}.weight")[-1]
            for i in range(layers) for n in spec.linears if f"{spec.layer_name(i)}.{n}.weight" in source.reader]


def check_spec(model: nn.Module, spec: ModelSpec, config: QuantConfig) -> None:
    """Every Linear the spec names exists in each layer and packs at this bit width."""
    multiple = pack_multiple(config.bits)
    for i, layer in enumerate(model.get_submodule(spec.layers)):
        for n in spec.linears:
            try:
                linear = layer.get_submodule(n)
            except AttributeError:
                raise UnsupportedModelError(
                    f"{spec.layer_name(i)} has no module {n!r}: the {spec.name!r} model-family spec does not fit "
                    f"this {type(model).__name__}; add a ModelSpec for it in bluelm_quant/models/__init__.py"
                ) from None
            if linear.in_features % multiple or linear.out_features % multiple:
                raise QuantConfigError(
                    f"{spec.layer_name(i)}.{n} is [{linear.out_features}, {linear.in_features}]: {config.bits}-bit "
                    f"packing needs both dimensions to be multiples of {multiple}"
                )


def check_windows(windows: torch.Tensor, vocab: int) -> None:
    if windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
        raise ValueError(
            f"calibration token ids span [{int(windows.min())}, {int(windows.max())}] but the model has "
            f"vocab_size={vocab}; the tokenizer does not belong to this model"
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
    source, spec = preflight(model_dir)
    work = WorkDir(out_dir)
    work.check_source(source.path)
    with output_lock(out_dir):
        return _quantize_locked(source, spec, work, config, windows, opts, device)


def _quantize_locked(source: ModelDir, spec: ModelSpec, work: WorkDir, config: QuantConfig, windows: torch.Tensor,
                     opts: RunOptions, device: torch.device) -> dict:
    register_auto_classes()
    model = build_skeleton(source, torch.float32)
    check_spec(model, spec, config)
    check_windows(windows, model.get_input_embeddings().num_embeddings)
    check_copied_tensors(model, spec, source)
    dtype = compute_dtype(opts, source_dtype(source, spec))
    settings = {
        **config.to_dict(),
        "model": os.path.abspath(source.path),
        "nsamples": int(windows.shape[0]),
        "seqlen": int(windows.shape[1]),
        "windows_sha256": _windows_digest(windows),
        "compute_dtype": str(dtype),
        "device_type": device.type,
        **opts.settings,
    }
    done = work.start(settings, opts.resume, opts.overwrite)
    layers: nn.ModuleList = model.get_submodule(spec.layers)
    if done:
        log.info("resuming: %d of %d layers already quantized in %s", done, len(layers), work.path)
    if done < len(layers):
        run = _Run(model=model, spec=spec, source=source, config=config, work=work, device=device, dtype=dtype,
                   progress=opts.progress)
        per_layer = _quantize_layers(run, windows, done)
    else:
        per_layer = [work.load_stats(i) for i in range(len(layers))]
    with writing(work.path):
        assemble_checkpoint(model, spec, source, work, config, opts.max_shard_size)
    work.finish()
    # The checkpoint is published first: the report is optional, and its failures are warnings.
    return write_report(work.out_dir, per_layer, settings)


@dataclass
class _Run:
    """What the layer loop of one quantize_model call works with."""

    model: nn.Module  # the skeleton: decoder layers are loaded one at a time
    spec: ModelSpec
    source: ModelDir
    config: QuantConfig
    work: WorkDir
    device: torch.device
    dtype: torch.dtype  # the layers' forward dtype
    progress: bool


def _quantize_layers(run: _Run, windows: torch.Tensor, done: int) -> list[dict]:
    """LayerJobs over the decoder layers: quantize (or restore on resume), save, propagate."""
    spec, layers = run.spec, run.model.get_submodule(run.spec.layers)
    batch = max(1, TOKENS_PER_BATCH // windows.shape[1])
    hidden, layer_kwargs = _first_layer_inputs(run, windows, batch)

    def source_weight(index: int, linear: str) -> torch.Tensor:
        return read_copy(run.source.reader, f"{spec.layer_name(index)}.{linear}.weight")

    layer_run = LayerRun(spec, run.config, run.device, batch, layer_kwargs, source_weight)
    per_layer = []
    bar = tqdm(range(len(layers)), desc="quantizing", unit="layer", disable=not run.progress)
    for i in bar:
        job = LayerJob(layer_run, i, layers[i])
        materialize(layers[i], spec.layer_name(i), run.source.reader, run.device, run.dtype)
        if i < done:
            stats = _restore(run, job)
        else:
            stats = _quantize_and_save(run, job, hidden)
            bar.set_postfix_str(" ".join(f"{n.rpartition('.')[2]}={s['loss']:.3g}" for n, s in stats["linears"].items()))
        if i + 1 < len(layers):  # the last layer's outputs feed nothing
            job.propagate(hidden)
            if not all_finite(hidden):
                raise NonFiniteActivationError(
                    f"{job.name} produced NaN/Inf activations; try --dtype float32, a larger --damp, or check the "
                    "source weights"
                )
        layers[i].to("meta")
        per_layer.append(stats)
    return per_layer


def _first_layer_inputs(run: _Run, windows: torch.Tensor, batch: int):
    """(hidden states, layer keyword arguments) at the first decoder layer, for all windows."""
    before = [name for name in run.spec.before if _has_module(run.model, name)]
    for name in before:
        materialize(run.model.get_submodule(name), name, run.source.reader, run.device, run.dtype)
    layers = run.model.get_submodule(run.spec.layers)
    captured = capture_first_layer_inputs(run.model, layers, windows, run.device, run.dtype, batch)
    for name in before:
        run.model.get_submodule(name).to("meta")  # the embedding is no longer needed
    return captured


def _quantize_and_save(run: _Run, job: LayerJob, hidden: torch.Tensor) -> dict:
    start = time.perf_counter()
    result = job.quantize(hidden)
    stats = {"layer": job.index, "linears": result.stats, "seconds": time.perf_counter() - start,
             **_sizes(job.layer, result, run.spec)}
    run.work.save_layer(job.index, result.flat(), stats)
    return stats


def _restore(run: _Run, job: LayerJob) -> dict:
    tensors, stats = run.work.load_layer(job.index)
    job.restore(LayerResult.from_flat(tensors, run.spec.linears, stats["linears"]))
    return stats


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _sizes(layer: nn.Module, result: LayerResult, spec: ModelSpec) -> dict:
    before = sum(layer.get_submodule(n).weight.numel() * 2 for n in spec.linears)  # vs 16-bit weights
    after = sum(t.numel() * t.element_size() for t in result.flat().values())
    return {"bytes_fp16": before, "bytes_quantized": after}


def quantize(model_dir: str, out_dir: str, config: QuantConfig, calib: Calibration | None = None,
             opts: RunOptions | None = None) -> dict:
    """Tokenize the calibration text with the model's tokenizer, then `quantize_model`."""
    from .data import calibration_windows

    calib = calib or Calibration()
    opts = opts or RunOptions()
    resolve_device(opts.device)  # bad input fails here, not after tokenizing
    source, _ = preflight(model_dir)
    WorkDir(out_dir).check_source(source.path)
    with output_lock(out_dir):  # before tokenizing: a second run on this output fails at once
        register_auto_classes()
        tokenizer = source.load_tokenizer()
        windows = calibration_windows(tokenizer, calib.sources, nsamples=calib.nsamples, seqlen=calib.seqlen,
                                      seed=calib.seed)
        opts.settings = {**opts.settings, **calib.describe()}
        return quantize_model(model_dir, out_dir, config, windows, opts)


__all__ = ["Calibration", "RunOptions", "check_spec", "linear_in_features", "compute_dtype", "preflight", "quantize", "quantize_model"]
