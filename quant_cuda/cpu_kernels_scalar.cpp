// Portable bodies of the CPU kernels, for CPUs without AVX2/FMA (cpu_kernels.cpp picks
// them at run time). Same loop structure and arithmetic as cpu_kernels_avx2.cpp, one
// column at a time; fp32 results may differ from the AVX2 body in the last bits
// (separate multiply and add instead of FMA).
#include <cstdint>

#include "cpu_kernels.h"
#include "kernels.h"

namespace quant_cuda {
namespace cpu {

namespace {
inline float load_f(const void* p, int dtype, int64_t i) {
  return dtype == kFloat32 ? static_cast<const float*>(p)[i]
                           : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}
inline void store_f(void* p, int dtype, int64_t i, float v) {
  if (dtype == kFloat32)
    static_cast<float*>(p)[i] = v;
  else
    static_cast<uint16_t*>(p)[i] = float_to_bf16(v);
}
inline float zero_of(const int32_t* qzeros, int64_t N, int64_t g, int64_t c) {
  const uint32_t word = uint32_t(qzeros[g * (N / 8) + c / 8]);
  return float(((word >> (4 * (c % 8))) & 0xFu) + 1u);
}
}  // namespace

void gemm_columns_scalar(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1, float* acc) {
  const int64_t N = a.N, K = a.K, G = a.G, gs = a.group_size;
  for (int64_t m = 0; m < a.M; ++m) {
    const float* xr = a.x + m * K;
    for (int64_t c = c0; c < c0 + width; ++c) {
      const int32_t* wc = qweight_column(a, c);
      const int64_t ld = qweight_stride(a);
      float sum = acc[m * N + c];
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t kp1 = (g + 1) * gs < K ? (g + 1) * gs / 8 : K / 8;
        float gacc = 0.0f;
        for (int64_t kp = g * gs / 8; kp < kp1; ++kp) {
          const uint32_t w = uint32_t(wc[kp * ld]);
          for (int j = 0; j < 7; ++j) gacc += float(int32_t(w & (0xFu << (4 * j)))) * xr[kp * 8 + j];
          gacc += float(w >> 28) * xr[kp * 8 + 7];
        }
        const float s = load_f(a.scales, a.dtype, g * N + c);
        sum += s * (gacc - zero_of(a.qzeros, N, g, c) * a.xsum[m * G + g]);
      }
      acc[m * N + c] = sum;
    }
  }
}

void dequant_packed_row_scalar(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                               void* out, int64_t kp, int64_t N, int64_t group_size, int dtype) {
  const int64_t g = kp * 8 / group_size;
  for (int64_t c = 0; c < N; ++c) {
    const uint32_t w = uint32_t(qweight[kp * N + c]);
    const float s = load_f(scales, dtype, g * N + c), z = zero_of(qzeros, N, g, c);
    for (int j = 0; j < 8; ++j)
      store_f(out, dtype, (kp * 8 + j) * N + c, (float((w >> (4 * j)) & 0xFu) - z) * s);
  }
}

}  // namespace cpu
}  // namespace quant_cuda
