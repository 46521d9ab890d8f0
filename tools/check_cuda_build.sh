#!/usr/bin/env bash
# CI compile check of the CUDA build of quant_cuda; needs no GPU.
#
#   tools/check_cuda_build.sh [PYTHON]
#
# PYTHON (default: python3) must have a CUDA build of torch (e.g. /work/cuda-venv/bin/python)
# and ninja. Builds CUDA + CPU kernels for TORCH_CUDA_ARCH_LIST (default: 7.5 .. 9.0) into a
# temporary directory, imports the module under that torch and runs the CPU op once. Exits
# non-zero when any source fails to compile (QUANT_CUDA_BUILD=cuda: no quiet CPU-only build),
# when quant_cuda/gemm_4bit.cu is missing, or when the module does not import or run.
set -euo pipefail

PY=${1:-${PYTHON:-python3}}
# The import check below runs from the build directory: a relative path must not break it.
if [[ "$PY" == */* ]]; then PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"; fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"7.5;8.0;8.6;8.9;9.0"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export QUANT_CUDA_BUILD=cuda
export PATH="$(dirname "$(command -v "$PY")"):$PATH"  # the venv's ninja

WORK=$(mktemp -d "${TMPDIR:-/tmp}/quant_cuda_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
echo "check_cuda_build: $("$PY" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'), \
CUDA_HOME=$CUDA_HOME, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS"

start=$SECONDS
if ! (cd "$ROOT" && "$PY" setup.py --quiet build_ext --build-temp "$WORK/temp" --build-lib "$WORK/lib"); then
    echo "check_cuda_build: FAILED to build quant_cuda with CUDA after $((SECONDS - start)) s" >&2
    exit 1
fi
echo "check_cuda_build: built in $((SECONDS - start)) s"

# Import from the build directory only (not the source tree), then run the CPU op against
# a dequantize-then-matmul computed here with plain torch.
(cd "$WORK/lib" && "$PY" - <<'PY'
import quant_cuda  # before torch: the module finds torch's libraries through its RPATH
import torch

assert quant_cuda.__file__.endswith(".so"), quant_cuda.__file__
assert quant_cuda.with_cuda, "the module was built without its CUDA kernels"
print(f"check_cuda_build: imported {quant_cuda.__file__} (archs {quant_cuda.cuda_archs}, CPU {quant_cuda.get_cpu_isa()})")

torch.manual_seed(0)
K, N, G = 256, 40, 2  # group size 128
codes = torch.randint(0, 16, (K, N), dtype=torch.int64)
zeros = torch.randint(1, 16, (G, N), dtype=torch.int64)
scales = torch.rand(G, N) * 0.02
shift = 4 * torch.arange(8)
pack = lambda c, dim: ((c.unflatten(dim, (-1, 8)) << shift.view([-1 if d == dim + 1 else 1 for d in range(c.dim() + 1)])).sum(dim + 1))
qweight = (pack(codes, 0) - ((pack(codes, 0) >= 2**31).long() << 32)).to(torch.int32)
qzeros = (pack(zeros - 1, 1) - ((pack(zeros - 1, 1) >= 2**31).long() << 32)).to(torch.int32)
w = scales.repeat_interleave(128, 0) * (codes - zeros.repeat_interleave(128, 0)).float()
x = torch.randn(3, K)
y = torch.ops.bluelm_quant.gemm_4bit(x, qweight, qzeros, scales, None, 128, None)
torch.testing.assert_close(y, x @ w, rtol=1e-4, atol=1e-4)
print("check_cuda_build: CPU op OK under torch", torch.__version__)
PY
)
echo "check_cuda_build: OK in $((SECONDS - start)) s"
