// Dequantize the whole weight once: out = W^T [K, N] in fp16/bf16, rows in qweight's order.
// For large batches ops.py multiplies this with cuBLAS (tensor cores), which beats any
// CUDA-core kernel once the product, not the weight read, dominates.
//
// Work split: one thread per 16-byte qweight load = 8 rows x 4 columns of codes.
//   block (32, 8): threadIdx.x walks 32 column threads (128 columns), so a warp reads one
//   512-byte segment of a qweight row and writes 8 output rows of 256 contiguous bytes;
//   threadIdx.y walks 8 slabs. The grid strides over slabs when K/8 exceeds 65535 x 8.
// Every weight is computed as a * f + b in fp32 (exact) and rounded once to the output
// dtype: bitwise the same as the reference dequantize_reference(dtype=x.dtype).
#pragma once
#include "q4_common.cuh"

namespace quant_cuda {
namespace q4 {

struct DequantArgs {
  const int32_t* qweight;  // [K/8, N]
  const int32_t* qzeros;   // [G, N/8]
  const uint16_t* scales;  // [G, N]
  uint16_t* out;           // [K, N]
  int64_t K, N, group_size;
};

constexpr int kDequantColThreads = 32;  // blockDim.x
constexpr int kDequantSlabs = 8;        // blockDim.y

Q4_HD void store8(uint16_t* p, uint32_t lo, uint32_t hi) {
#ifdef __CUDA_ARCH__
  *reinterpret_cast<uint2*>(p) = make_uint2(lo, hi);
#else
  const uint32_t v[2] = {lo, hi};
  std::memcpy(p, v, 8);
#endif
}

// Rows 8*slab .. 8*slab+7, columns col0 .. col0+3.
template <class D>
Q4_HD void dequant_thread(const DequantArgs& a, int64_t slab, int64_t col0) {
  const uint4 qv = load_stream16(a.qweight + slab * a.N + col0);
  float f[4][8];
  unpack8(qv.x, f[0]);
  unpack8(qv.y, f[1]);
  unpack8(qv.z, f[2]);
  unpack8(qv.w, f[3]);
  GroupConst gc;
  int64_t g_end = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int64_t r = 8 * slab + j;
    if (r >= g_end) {  // any group_size >= 1; at most one division per group met
      const int64_t g = r / a.group_size;
      g_end = (g + 1) * a.group_size;
      load_group<D>(a.qzeros, a.scales, a.N, g, col0, gc);
    }
    uint32_t h[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) h[c] = D::from_float(fmaf(gc.a[c], f[c][j], gc.b[c]));
    store8(a.out + r * a.N + col0, h[0] | (h[1] << 16), h[2] | (h[3] << 16));
  }
}

// grid = (ceil(N / 128), min(ceil(K / 64), 65535)); block = (32, 8).
template <class D>
__global__ void __launch_bounds__(kDequantColThreads * kDequantSlabs)
    dequant_4bit_kernel(const DequantArgs a) {
  const int64_t col0 = 4 * (int64_t(blockIdx.x) * kDequantColThreads + threadIdx.x);
  if (col0 >= a.N) return;
  const int64_t slabs = a.K / 8;
  for (int64_t slab = int64_t(blockIdx.y) * kDequantSlabs + threadIdx.y; slab < slabs;
       slab += int64_t(gridDim.y) * kDequantSlabs)
    dequant_thread<D>(a, slab, col0);
}

}  // namespace q4
}  // namespace quant_cuda
