"""QuantLinear: a Linear layer whose weight lives in the standard GPTQ tensors.

Persistent buffers (what a checkpoint holds): qweight, qzeros, scales, g_idx and an
optional bias, in the layout described in qlayer.py. `post_init()` asks ops.prepare for the
kernel's layout once the tensors are loaded: for act-order layers qweight's rows are
regrouped in place of the checkpoint's order (one copy of the weights, not two) and the
permutation is kept as a non-persistent buffer `kernel_perm`. On the CPU a decode-ready model
may also hold qweight's words in column blocks (`kernel_block`, set by `use_column_blocks`:
column_blocks.py); a move to another device goes back to the plain layout. Saving
(state_dict) writes the standard layout back, bit for bit; loading a state dict builds the
kernel layout again. So the storage format never depends on the kernel.
"""
from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
from torch import nn

from . import ops
from .autograd import quant_matmul
from .config import QuantConfig, SUPPORTED_BITS
from .packing import gptq_tensors, pack_multiple
from .quantizer import QuantizedWeight, default_g_idx, rtn


_TENSOR_NAMES = frozenset({"qweight", "qzeros", "scales", "g_idx", "bias", "kernel_perm", "kernel_group_size",
                           "kernel_block"})


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int = 4,
        group_size: int = 128,
        bias: bool = False,
        dtype: torch.dtype = torch.float16,
        device=None,
    ):
        super().__init__()
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
        multiple = pack_multiple(bits)
        if in_features % multiple or out_features % multiple:
            raise ValueError(
                f"{bits}-bit QuantLinear needs in_features and out_features to be multiples of "
                f"{multiple}, got in_features={in_features}, out_features={out_features}"
            )
        if not (group_size == -1 or group_size > 0):
            raise ValueError(f"group_size={group_size} must be -1 (per-channel) or positive")
        if dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"dtype={dtype} must be float16, bfloat16 or float32")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        self.register_buffer("qweight", torch.zeros(in_features * bits // 32, out_features, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features * bits // 32, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=dtype, device=device))
        g_idx = default_g_idx(in_features, group_size)
        self.register_buffer("g_idx", g_idx.to(device) if device is not None else g_idx)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        # The kernel layout (post_init): qweight rows in kernel_perm order when it is set,
        # and the contiguous group size the kernels run with (None: the reference path).
        self.register_buffer("kernel_perm", None, persistent=False)
        self.kernel_group_size: int | None = None
        self.kernel_block: int | None = None  # qweight's words in column blocks of this width (CPU)
        # ops.GemmPlan for the activations seen so far (None: not made yet; False: none possible);
        # dropped whenever the tensors change (post_init, .to(), assigning a buffer).
        self._plan: ops.GemmPlan | None | bool = None

    # --- construction ----------------------------------------------------------------

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, group_size: int, bias=None, dtype=torch.float16) -> "QuantLinear":
        n, k = qw.codes.shape
        layer = cls(k, n, qw.bits, group_size, bias=bias is not None, dtype=dtype)
        layer.pack(qw, bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QuantConfig, dtype=None) -> "QuantLinear":
        """Quantize an nn.Linear with round-to-nearest on `config`'s grid."""
        qw = rtn(linear.weight.data, config)
        dtype = dtype or (linear.weight.dtype if linear.weight.is_floating_point() else torch.float16)
        layer = cls.from_quantized(qw, config.group_size, linear.bias, dtype)
        return layer.to(linear.weight.device)

    @torch.no_grad()
    def pack(self, qw: QuantizedWeight, bias=None) -> None:
        """Fill the buffers from a QuantizedWeight (codes [N, K], grid per group)."""
        n, k = qw.codes.shape
        if (n, k) != (self.out_features, self.in_features) or qw.bits != self.bits:
            raise ValueError(
                f"quantized weight [{n}, {k}] at {qw.bits} bits does not fit "
                f"QuantLinear({self.in_features}, {self.out_features}, bits={self.bits})"
            )
        if qw.scales.shape != self.scales.shape:
            raise ValueError(f"{qw.scales.shape[0]} groups given, layer has {self.scales.shape[0]}")
        device = self.qweight.device
        # the new tensors are in the standard layout
        self.kernel_perm, self.kernel_group_size, self.kernel_block = None, None, None
        for name, t in gptq_tensors(qw, self.scales.dtype).items():
            setattr(self, name, t.to(device))
        if bias is not None:
            if self.bias is None:
                raise ValueError("bias given to a QuantLinear built with bias=False")
            self.bias = bias.detach().to(self.scales.dtype).to(device)
        self.post_init()

    # --- kernel layout -----------------------------------------------------------------

    def post_init(self) -> None:
        """Build the kernel's layout once, after the standard tensors are loaded."""
        if self.kernel_perm is not None or self.kernel_block is not None:
            raise RuntimeError("QuantLinear.post_init() ran twice: qweight is already in the kernel's layout")
        layer = ops.prepare(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits)
        self.qweight, self.kernel_perm, self.kernel_group_size = layer.qweight, layer.perm, layer.group_size
        self._plan = None

    def quant_layer(self) -> ops.QLayer:
        """This layer's tensors as ops takes them."""
        return ops.QLayer(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.bias,
                          self.kernel_perm, self.kernel_group_size, self.kernel_block)

    @torch.no_grad()
    def use_column_blocks(self, block: int | None, in_place: bool = False) -> None:
        """qweight's words in column blocks of width `block` (qlayer.to_column_blocks; a multiple of 8
        dividing out_features; CPU only), or back in the plain layout with None. By default in a new
        tensor: a state_dict taken before, or a layer sharing the tensor, keeps its layout. in_place=True
        rewrites qweight's own storage (no second copy of the weights, a huge-page arena stays): only
        for a tensor nothing else holds (column_blocks.use_column_blocks right after packing)."""
        if block == self.kernel_block:
            return
        if block is not None and self.qweight.device.type != "cpu":
            raise ValueError(f"column blocks are a CPU kernel layout; this layer is on {self.qweight.device}")
        plain = self.quant_layer().column_qweight().contiguous()
        words = plain if block is None else ops.to_column_blocks(plain, block)
        if in_place and self.qweight.is_contiguous():
            self.qweight.copy_(words)
        else:
            self.qweight = words
        self.kernel_block = block  # drops the plan, which holds the old layout's view

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.kernel_perm is not None or self.kernel_block is not None:  # checkpoints hold the standard layout
            destination[prefix + "qweight"] = ops.standard_qweight(self.quant_layer())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "qweight" not in state_dict:  # nothing of ours arrives (e.g. PEFT loading adapters)
            return super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # The incoming qweight is in the standard order: forget the kernel layout, then rebuild it.
        self.kernel_perm, self.kernel_group_size, self.kernel_block = None, None, None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.post_init()

    # --- compute -----------------------------------------------------------------------

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        """The weight in nn.Linear orientation [out_features, in_features]."""
        return ops.dequantize(self.quant_layer(), dtype).T

    def __setattr__(self, name, value):
        if name in _TENSOR_NAMES:  # a plan holds the old tensors
            self.__dict__["_plan"] = None
        super().__setattr__(name, value)

    def _apply(self, fn, recurse=True):
        self._plan = None  # .to() / .float() / .cuda(): new tensors, maybe another dtype or device
        out = super()._apply(fn, recurse)
        if self.kernel_block is not None and self.qweight.device.type != "cpu":  # column blocks are the CPU kernel's
            self.use_column_blocks(None)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            # Like nn.Linear under autocast: compute and return the autocast dtype. The cast is
            # autograd's (gradients come back in x's dtype); the kernels run with autocast off so
            # that it does not re-round their inner matmuls.
            x = x.to(torch.get_autocast_dtype(device_type))
            with torch.autocast(device_type, enabled=False):
                return quant_matmul(x, self.quant_layer())
        plan = self._plan
        if plan and ops.plan_applies(plan, x):  # inference: the kernel call decided once (decode steps)
            return ops.run_plan(plan, x)
        # Differentiable in x (autograd.QuantMatmul: LoRA training); the quantized weight is frozen.
        layer = self.quant_layer()
        y = quant_matmul(x, layer)
        if plan is None and not (x.requires_grad and torch.is_grad_enabled()):
            # the first inference call has run the self-check: decide the fast path once
            self._plan = ops.plan_gemm(x, layer) or False
        return y

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}, dtype={self.scales.dtype}"
        )


def find_linears(model: nn.Module, include: Iterable[str] | None = None, exclude: Iterable[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """nn.Linear modules by qualified name; include/exclude are fnmatch patterns."""
    include, exclude = list(include or ["*"]), list(exclude)
    return {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and any(fnmatch.fnmatchcase(name, p) for p in include)
        and not any(fnmatch.fnmatchcase(name, p) or name.endswith("." + p) or name == p for p in exclude)
    }


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def replace_linear(
    model: nn.Module,
    config: QuantConfig,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] = ("lm_head",),
    quantize: bool = False,
    dtype: torch.dtype | None = None,
) -> list[str]:
    """Swap nn.Linear modules for QuantLinear; returns the names swapped.

    quantize=False builds empty QuantLinears on the Linear's device (meta for a
    skeleton) to be filled from a checkpoint; quantize=True quantizes each Linear's
    weight with round-to-nearest.
    """
    names = []
    for name, linear in find_linears(model, include, exclude).items():
        layer_dtype = dtype or linear.weight.dtype
        if quantize:
            q = QuantLinear.from_linear(linear, config, dtype=layer_dtype)
        else:
            q = QuantLinear(
                linear.in_features, linear.out_features, config.bits, config.group_size,
                bias=linear.bias is not None, dtype=layer_dtype, device=linear.weight.device,
            )
        set_module(model, name, q)
        names.append(name)
    return names
