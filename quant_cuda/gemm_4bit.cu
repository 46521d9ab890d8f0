// CUDA launchers of the 4-bit kernels (API and layout: kernels.h). Torch-free: raw
// pointers in, a Status code out; every argument is checked before anything is launched.
//
// gemm_4bit_cuda runs a fused dequantize-and-multiply kernel for any M: tensor cores on
// sm_80+ (q4_mma.cuh), CUDA cores otherwise (q4_gemv.cuh). It is the fast path for
// decode-sized M; for large M ops.py should call dequantize_4bit_cuda once and multiply
// with cuBLAS (the fused kernels re-read the weight from L2 for every 16 rows of x and
// keep no x tile in shared memory).
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "kernels.h"
#include "q4_dequant.cuh"
#include "q4_gemv.cuh"
#include "q4_mma.cuh"

namespace quant_cuda {
namespace {

using q4::Bf16;
using q4::Fp16;

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// A launch error that means "this binary has no code for the running GPU" gets its own code
// so the message can say to rebuild with the GPU's architecture in TORCH_CUDA_ARCH_LIST.
int launch_status() {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return kOk;
  if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) return kNoKernelForArch;
  return kLaunchFailed;
}

// Shapes the kernels index with int64 but launch over int grids: N / 32 tiles and K / 8
// slabs must fit comfortably, which every real layer does by orders of magnitude.
constexpr int64_t kMaxDim = int64_t(1) << 30;

bool bad_layer_shape(int64_t K, int64_t N, int64_t group_size) {
  return K < 8 || N < 8 || K % 8 != 0 || N % 8 != 0 || K > kMaxDim || N > kMaxDim || group_size < 1;
}

// Launches `kernel` over ceil(N / tile_n) column tiles and ceil(M / MT) row blocks, in
// several launches past the 65535 limit of gridDim.y.
template <int MT>
int launch_rows(void (*kernel)(q4::GemvArgs), int threads, int tile_n, q4::GemvArgs a, cudaStream_t stream) {
  constexpr int64_t kMaxRowBlocks = 65535;
  const unsigned tiles = unsigned((a.N + tile_n - 1) / tile_n);
  const int64_t total = a.M;
  const uint16_t* x = a.x;
  uint16_t* out = a.out;
  for (int64_t m0 = 0; m0 < total; m0 += kMaxRowBlocks * MT) {
    a.M = total - m0 < kMaxRowBlocks * MT ? total - m0 : kMaxRowBlocks * MT;
    a.x = x + m0 * a.K;
    a.out = out + m0 * a.N;
    kernel<<<dim3(tiles, unsigned((a.M + MT - 1) / MT)), threads, 0, stream>>>(a);
    const int status = launch_status();
    if (status != kOk) return status;
  }
  return kOk;
}

template <class D, int MT, bool kAligned, bool kGather>
int launch_gemv(const q4::GemvArgs& a, cudaStream_t stream) {
  constexpr int kThreads = q4::GemvConfig<MT, kAligned>::kThreads;
  return launch_rows<MT>(q4::gemv_4bit_kernel<D, MT, kAligned, kGather>, kThreads,
                         q4::GemvShape<kThreads>::kTileN, a, stream);
}

template <class D, int MT, bool kGather>
int launch_mma(const q4::GemvArgs& a, cudaStream_t stream) {
  using C = q4::MmaConfig<MT, kGather>;
  return launch_rows<MT>(q4::mma_4bit_kernel<D, MT, kGather>, C::kThreads, C::kTileN, a, stream);
}

// Tensor cores need the kernel to have been compiled for sm_80+ (mma.sync m16n8k16, bf16)
// and to run on such a device. The kernel's ptxVersion says which __CUDA_ARCH__ its code
// was built with, which also covers PTX JIT-compiled from an older compute_XX (that code
// has no MMA). Cached per device: the queries are not free.
bool mma_usable() {
  static std::atomic<int> cached[64];  // 0 = not asked yet, 1 = usable, 2 = not usable
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  int state = dev < 64 ? cached[dev].load(std::memory_order_relaxed) : 0;
  if (state == 0) {
    int major = 0;
    cudaFuncAttributes attr{};
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(q4::mma_4bit_kernel<Fp16, 8, false>)) ==
                        cudaSuccess &&
                    major >= 8 && attr.ptxVersion >= 80;
    cudaGetLastError();  // a missing kernel image here is not an error: the CUDA-core path runs
    state = ok ? 1 : 2;
    if (dev < 64) cached[dev].store(state, std::memory_order_relaxed);
  }
  return state == 1;
}

// The compiled kernels, per dtype (14 each), and when each runs:
// - tensor cores (sm_80+, K % 32 == 0, group_size % 8 == 0: every real layer): MT = 8 for
//   M <= 8 (rows are free: the MMA is 16 rows tall), MT = 16 for larger M, as ceil(M / 16)
//   row blocks; plain x or gathered x (act-order perm, or an x that is not 16-byte aligned).
// - CUDA cores (sm_75, or K % 32 != 0): MT = 1, 2, 4, 8 so small M wastes no FMAs, larger
//   M as ceil(M / 8) row blocks, plain or gathered x.
// - any group_size % 8 != 0: per-row group constants on CUDA cores, MT = 1 and 8.
template <class D, bool kGather>
int dispatch_rows(const q4::GemvArgs& a, cudaStream_t stream) {
  if (a.M <= 1) return launch_gemv<D, 1, true, kGather>(a, stream);
  if (a.M <= 2) return launch_gemv<D, 2, true, kGather>(a, stream);
  if (a.M <= 4) return launch_gemv<D, 4, true, kGather>(a, stream);
  return launch_gemv<D, 8, true, kGather>(a, stream);
}

template <class D, bool kGather>
int dispatch_gemm(const q4::GemvArgs& a, cudaStream_t stream) {
  if (a.group_size % 8 != 0)
    return a.M <= 1 ? launch_gemv<D, 1, false, true>(a, stream) : launch_gemv<D, 8, false, true>(a, stream);
  if (a.K % 32 == 0 && mma_usable())
    return a.M <= 8 ? launch_mma<D, 8, kGather>(a, stream) : launch_mma<D, 16, kGather>(a, stream);
  return dispatch_rows<D, kGather>(a, stream);
}

}  // namespace

int gemm_4bit_cuda(const void* x, const int32_t* qweight, const int32_t* qzeros, const void* scales,
                   const int32_t* perm, const void* bias, void* out, int64_t M, int64_t K, int64_t N,
                   int64_t group_size, int dtype, void* stream) {
  if (M < 1 || bad_layer_shape(K, N, group_size)) return kBadShape;
  if (dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (x == nullptr || qweight == nullptr || qzeros == nullptr || scales == nullptr || out == nullptr)
    return kBadShape;
  // Vector loads: qweight 16 B (4 columns x 8 rows), scales 8 B (4 columns), perm 16 B,
  // out and bias 2 B. Contiguous tensors from the caching allocator always satisfy these.
  if (!aligned(qweight, 16) || !aligned(scales, 8) || !aligned(qzeros, 4) || !aligned(out, 2) ||
      (perm != nullptr && !aligned(perm, 16)) || (bias != nullptr && !aligned(bias, 2)) || !aligned(x, 2))
    return kBadShape;

  q4::GemvArgs a;
  a.x = static_cast<const uint16_t*>(x);
  a.qweight = qweight;
  a.qzeros = qzeros;
  a.scales = static_cast<const uint16_t*>(scales);
  a.perm = perm;
  a.bias = static_cast<const uint16_t*>(bias);
  a.out = static_cast<uint16_t*>(out);
  a.M = M, a.K = K, a.N = N, a.group_size = group_size;
  const bool gather = perm != nullptr || !aligned(x, 16);  // else x rows load 16 B at a time
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == kFloat16) return gather ? dispatch_gemm<Fp16, true>(a, s) : dispatch_gemm<Fp16, false>(a, s);
  return gather ? dispatch_gemm<Bf16, true>(a, s) : dispatch_gemm<Bf16, false>(a, s);
}

int dequantize_4bit_cuda(const int32_t* qweight, const int32_t* qzeros, const void* scales, void* out,
                         int64_t K, int64_t N, int64_t group_size, int dtype, void* stream) {
  if (bad_layer_shape(K, N, group_size)) return kBadShape;
  if (dtype != kFloat16 && dtype != kBFloat16) return kBadDType;
  if (qweight == nullptr || qzeros == nullptr || scales == nullptr || out == nullptr) return kBadShape;
  if (!aligned(qweight, 16) || !aligned(scales, 8) || !aligned(qzeros, 4) || !aligned(out, 8)) return kBadShape;

  q4::DequantArgs a;
  a.qweight = qweight;
  a.qzeros = qzeros;
  a.scales = static_cast<const uint16_t*>(scales);
  a.out = static_cast<uint16_t*>(out);
  a.K = K, a.N = N, a.group_size = group_size;
  constexpr int64_t kColsPerBlock = 4 * q4::kDequantColThreads;
  constexpr int64_t kSlabsPerBlock = q4::kDequantSlabs;
  const int64_t slab_blocks = (K / 8 + kSlabsPerBlock - 1) / kSlabsPerBlock;
  const dim3 grid(unsigned((N + kColsPerBlock - 1) / kColsPerBlock), unsigned(slab_blocks < 65535 ? slab_blocks : 65535));
  const dim3 block(q4::kDequantColThreads, q4::kDequantSlabs);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == kFloat16)
    q4::dequant_4bit_kernel<Fp16><<<grid, block, 0, s>>>(a);
  else
    q4::dequant_4bit_kernel<Bf16><<<grid, block, 0, s>>>(a);
  return launch_status();
}

}  // namespace quant_cuda
