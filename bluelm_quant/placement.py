"""Where a loaded model's tensors live, and the two memory savers for small GPUs.

- `resolve_device` / `check_dtype`: validate the target before anything is read, with
  errors that name the value and say what to do.
- `CPUEmbedding`: the token-embedding table stays in host memory; only the looked-up
  rows travel to the device (saves vocab x hidden x 2 bytes of GPU memory: 0.82 GB
  for BlueLM-7B).
- `Int8Linear`: a weight-only int8 lm_head, one scale per output row (halves the
  0.82 GB fp16 lm_head of BlueLM-7B; SmolLM2 held-out perplexity moved by <0.3%).
- `quantize_head_4bit`: a 4-bit lm_head (a quarter of the fp16 one), quantized at load time.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

log = logging.getLogger(__name__)

COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class DeviceError(ValueError):
    """The requested device does not exist or cannot run the model."""


class DeviceMemoryError(RuntimeError):
    """The model does not fit in the device's free memory."""


def resolve_device(device) -> torch.device:
    """'cpu', 'cuda', 'cuda:N' or a torch.device -> a concrete torch.device (CUDA with index)."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"device={device!r} is not a device name torch understands ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if d.type == "cpu":
        return torch.device("cpu")
    if d.type != "cuda":
        raise DeviceError(f"device={device!r}: bluelm-quant runs on 'cpu' or 'cuda[:N]' only, not on {d.type!r} devices")
    if not torch.cuda.is_available():
        why = (
            f"this PyTorch build ({torch.__version__}) has no CUDA support"
            if torch.version.cuda is None
            else "no CUDA GPU is visible to PyTorch (check the driver and CUDA_VISIBLE_DEVICES)"
        )
        raise DeviceError(f"device={device!r} but {why}; load with device='cpu'")
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if d.index is None else d.index
    if index >= count:
        raise DeviceError(f"device={device!r} does not exist: {count} GPU(s) visible, cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


def dtype_support(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """(whether `device` computes in `dtype` natively, why not)."""
    if device.type == "cuda" and dtype == torch.bfloat16:
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            # torch.cuda.is_bf16_supported() says True on some older GPUs (emulation); the
            # kernels and cuBLAS need real bf16 arithmetic, which starts with Ampere.
            name = torch.cuda.get_device_name(device)
            return False, f"{name} (compute capability {major}.{minor}) has no bfloat16 arithmetic; that needs 8.0 (Ampere) or newer"
    return True, ""


def check_dtype(device: torch.device, dtype: torch.dtype, allow_fallback: bool = False, source: str = "dtype") -> torch.dtype:
    """`dtype` if `device` can run it; else an error, or the fallback when asked for."""
    if dtype not in COMPUTE_DTYPES:
        raise DeviceError(f"{source}={dtype} is not a compute dtype; use torch.float16, torch.bfloat16 or torch.float32")
    ok, why = dtype_support(device, dtype)
    if ok:
        return dtype
    fallback = torch.float16 if device.type == "cuda" else torch.float32
    if not allow_fallback:
        raise DeviceError(
            f"{source}={dtype} cannot be honoured on {device}: {why}. Load with dtype=torch.float16, "
            f"or pass allow_dtype_fallback=True to load as {fallback} instead"
        )
    log.warning("%s=%s cannot run on %s (%s); loading as %s as allowed", source, dtype, device, why, fallback)
    return fallback


class CPUEmbedding(nn.Module):
    """nn.Embedding whose table stays on the CPU; the looked-up rows move to `output_device`.

    The table is a buffer, not a parameter, so `model.device` (the first parameter's
    device) stays the accelerator and `generate` puts its inputs there. `.to()` / `.cuda()`
    on the model only change where the rows are sent (and the table's dtype on the CPU).
    """

    def __init__(self, weight: torch.Tensor, padding_idx: int | None, output_device):
        super().__init__()
        if weight.device.type != "cpu":
            raise DeviceError(f"CPUEmbedding keeps its table on the CPU; got a table on {weight.device}")
        self.register_buffer("weight", weight)
        self.padding_idx = padding_idx
        self.output_device = torch.device(output_device)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(input_ids.to("cpu"), self.weight, self.padding_idx)
        return rows.to(self.output_device)

    def _apply(self, fn, recurse=True):
        # A probe tensor tells where (and in which dtype) the rest of the model is going.
        probe = fn(torch.empty(0, dtype=self.weight.dtype))
        self.output_device = probe.device
        if probe.dtype != self.weight.dtype:
            self.weight = self.weight.to(probe.dtype)
        return self

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, table on cpu, rows to {self.output_device}"


class Int8Linear(nn.Module):
    """y = x @ (scale[:, None] * q).T, q int8 [N, K] symmetric per output row, no bias.

    On the CPU, below int8_ops.CPU_INT8_DEQUANT_MIN_M rows, the int8 kernel (ops.gemm_int8)
    reads the int8 weight as it is. Otherwise the weight is dequantized CHUNK_ROWS rows at
    a time, so no full-precision copy of it ever exists (64 MB of temporaries for BlueLM's
    100096 x 4096 head in fp16). torch's fused CPU op (_weight_int8pack_mm) was measured
    slower at every batch size here (SmolLM2's 49152 x 576 head, 1 thread: M=1 26 ms vs
    22 ms chunked, M=64 2.5 s vs 80 ms).
    """

    CHUNK_ROWS = 8192

    def __init__(self, in_features: int, out_features: int, dtype=torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    @torch.no_grad()
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype, device=None) -> "Int8Linear":
        """Quantize a [N, K] weight row by row (on the weight's device, in fp32, a chunk at a time)."""
        n, k = weight.shape
        layer = cls(k, n, dtype, device=weight.device)
        for i in range(0, n, cls.CHUNK_ROWS):
            w = weight[i : i + cls.CHUNK_ROWS].float()
            scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            scale = scale.to(dtype).float()  # quantize against the scale actually stored
            layer.weight_int8[i : i + cls.CHUNK_ROWS] = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            layer.weight_scale[i : i + cls.CHUNK_ROWS] = scale.to(dtype)
        return layer.to(device) if device is not None else layer

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if ops.int8_kernel_runs(x):
            return ops.gemm_int8(x, self.weight_int8, self.weight_scale)
        x2 = x.reshape(-1, self.in_features)
        parts = []
        for i in range(0, self.out_features, self.CHUNK_ROWS):
            w = self.weight_int8[i : i + self.CHUNK_ROWS].to(x.dtype)
            parts.append((x2 @ w.T) * self.weight_scale[i : i + self.CHUNK_ROWS].to(x.dtype))
        return torch.cat(parts, dim=-1).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, scales {self.weight_scale.dtype}"


# The 4-bit lm_head: round-to-nearest at load time (no calibration data), asymmetric groups of 32. SmolLM2-135M-Instruct 4-bit g128 act-order, bundled held-out text,
# 8 x 512-token windows, perplexity en / zh (full-precision model 25.84 / 11.12):
#   lm_head fp32 31.11 / 14.70, int8 per row 31.20 / 14.70,
#   4-bit g32 sym + clip 34.32 / 15.83, g32 asym 34.71 / 16.57, g32 asym + clip 35.12 / 16.11,
#   g64 asym 36.77 / 17.75, g64 asym + clip 37.07 / 17.94.
# So 4-bit costs ~12% perplexity on this small tied-embedding model: an option, 8-bit the better
# trade. The MSE clip search would win back a third of it but took 378 s for this head (loaded
# 2-core machine) against ~1 s: too slow for load time.
HEAD_4BIT_GROUP_SIZE = 32


def quantize_head_4bit(weight: torch.Tensor, dtype: torch.dtype, device=None,
                       group_size: int = HEAD_4BIT_GROUP_SIZE) -> nn.Module:
    """A 4-bit QuantLinear lm_head from a [N, K] weight: round-to-nearest on asymmetric groups of
    `group_size` input columns (scale and zero each, scales in `dtype`). Runs the 4-bit kernel."""
    from .config import QuantConfig
    from .nn import QuantLinear
    from .quantizer import rtn

    n, k = weight.shape
    if k % group_size or group_size % 8:
        raise ValueError(f"lm_head_bits=4: in_features={k} must be a multiple of the head's group size {group_size} "
                         "(itself a multiple of 8); use lm_head_bits=8")
    config = QuantConfig(bits=4, group_size=group_size, sym=False)
    layer = QuantLinear.from_quantized(rtn(weight.detach().float(), config), group_size, None, dtype)
    return layer.requires_grad_(False).to(device) if device is not None else layer.requires_grad_(False)


def head_bytes(numel: int, rows: int, fsize: int, bits: int) -> int:
    """Bytes of a quantized lm_head of `numel` weights and `rows` outputs (scales `fsize` bytes)."""
    if bits == 8:
        return numel + rows * fsize
    groups = numel // HEAD_4BIT_GROUP_SIZE
    return numel // 2 + groups * fsize + groups // 2  # codes, scales, packed 4-bit zeros


def model_device(model: nn.Module) -> torch.device:
    """Where a model's activations go: its first parameter's device. A CPUEmbedding's table is
    a buffer on the CPU, so buffers only count for a model without parameters."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def tensor_bytes(model: nn.Module, device_type: str) -> int:
    """Bytes of distinct parameter/buffer storages on devices of `device_type` (shared ones once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != device_type:
            continue
        key = (t.device, t.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total
