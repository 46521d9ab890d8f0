// AVX2 + FMA bodies of the CPU kernels. Compiled without -mavx2: every function here
// carries a target attribute instead, so the rest of the extension (and the scalar
// fallback) stays baseline x86-64 and the .so loads on any CPU; cpu_isa.cpp enables
// these only after __builtin_cpu_supports says AVX2 and FMA are there. For the same
// reason this file must not instantiate std templates (they would be emitted as AVX2
// code that the linker may pick for other files).
//
// GEMM layout reminder: qweight[kp][c] packs rows 8kp..8kp+7 of column c, so one
// 256-bit load of qweight[kp][c..c+7] gives 8 columns x 8 rows. A micro-tile is MR
// activation rows x 8V columns; per group it sums q * x into `gacc` (q the raw code)
// and folds the group in once: acc += scale * (gacc - zero * sum(x over the group)).
// That moves the zero and scale out of the inner loop: per 8 weights the inner loop
// costs one AND, one int->float convert and MR FMAs.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#include "cpu_kernels.h"
#include "kernels.h"

#define QC_AVX2 __attribute__((target("avx2,fma")))

namespace quant_cuda {
namespace cpu {

namespace {

QC_AVX2 inline __m256 load_scales8(const void* scales, int dtype, int64_t offset) {
  if (dtype == kFloat32) return _mm256_loadu_ps(static_cast<const float*>(scales) + offset);
  const __m128i h = _mm_loadu_si128(
      reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(scales) + offset));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// True zeros (stored + 1) of the 8 columns packed in one qzeros word, as floats.
QC_AVX2 inline __m256 zeros8(int32_t word) {
  const __m256i shifts = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28);
  const __m256i z = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(word), shifts),
                                     _mm256_set1_epi32(0xF));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(z, _mm256_set1_epi32(1)));
}

// Code j of each lane as a float, times 16^j for j < 7 (see cpu_kernels.h).
template <int J>
QC_AVX2 inline __m256 code_scaled(__m256i w) {
  if (J == 7) return _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28));
  return _mm256_cvtepi32_ps(_mm256_and_si256(w, _mm256_set1_epi32(0xF << (4 * J))));
}

template <int MR, int V, int J>
QC_AVX2 inline void fma_nibble(__m256 (&gacc)[MR][V], const __m256i (&w)[V],
                               const float* const (&xr)[MR]) {
  __m256 q[V];
  for (int v = 0; v < V; ++v) q[v] = code_scaled<J>(w[v]);
  for (int m = 0; m < MR; ++m) {
    const __m256 xb = _mm256_broadcast_ss(xr[m] + J);
    for (int v = 0; v < V; ++v) gacc[m][v] = _mm256_fmadd_ps(q[v], xb, gacc[m][v]);
  }
}

template <int MR, int V>
QC_AVX2 void micro_tile(const GemmArgs& a, int64_t m0, int64_t c0, int64_t g0, int64_t g1, float* acc) {
  const int64_t N = a.N, K = a.K, G = a.G, gs = a.group_size, rows_packed = K / 8;
  __m256 oacc[MR][V];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) oacc[m][v] = _mm256_loadu_ps(acc + (m0 + m) * N + c0 + 8 * v);

  for (int64_t g = g0; g < g1; ++g) {
    const int64_t kp0 = g * gs / 8, kp1 = (g + 1) * gs / 8 < rows_packed ? (g + 1) * gs / 8 : rows_packed;
    __m256 gacc[MR][V];
    for (int m = 0; m < MR; ++m)
      for (int v = 0; v < V; ++v) gacc[m][v] = _mm256_setzero_ps();

    for (int64_t kp = kp0; kp < kp1; ++kp) {
      const int32_t* wrow = qweight_column(a, c0) + kp * qweight_stride(a);
      __m256i w[V];
      for (int v = 0; v < V; ++v) w[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wrow + 8 * v));
      const float* xr[MR];
      for (int m = 0; m < MR; ++m) xr[m] = a.x + (m0 + m) * K + kp * 8;
      fma_nibble<MR, V, 0>(gacc, w, xr);
      fma_nibble<MR, V, 1>(gacc, w, xr);
      fma_nibble<MR, V, 2>(gacc, w, xr);
      fma_nibble<MR, V, 3>(gacc, w, xr);
      fma_nibble<MR, V, 4>(gacc, w, xr);
      fma_nibble<MR, V, 5>(gacc, w, xr);
      fma_nibble<MR, V, 6>(gacc, w, xr);
      fma_nibble<MR, V, 7>(gacc, w, xr);
    }

    for (int v = 0; v < V; ++v) {
      const int64_t c = c0 + 8 * v;
      const __m256 s = load_scales8(a.scales, a.dtype, g * N + c);
      const __m256 z = zeros8(a.qzeros[g * (N / 8) + c / 8]);
      for (int m = 0; m < MR; ++m) {
        const __m256 t = _mm256_fnmadd_ps(z, _mm256_set1_ps(a.xsum[(m0 + m) * G + g]), gacc[m][v]);
        oacc[m][v] = _mm256_fmadd_ps(s, t, oacc[m][v]);
      }
    }
  }

  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < V; ++v) _mm256_storeu_ps(acc + (m0 + m) * N + c0 + 8 * v, oacc[m][v]);
}

// Rows in blocks of up to 4 over the same columns; the tile's weights (K/8 x 128 bytes)
// stay in L2 across row blocks. Tile widths keep MR*V <= 8 group accumulators in the
// 16 ymm registers beside the weights and broadcasts.
template <int V>
QC_AVX2 void rows_over_tile(const GemmArgs& a, int64_t c0, int64_t g0, int64_t g1, float* acc) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.M; m0 += 4) {
    if (V == 4) {
      micro_tile<4, 2>(a, m0, c0, g0, g1, acc);
      micro_tile<4, 2>(a, m0, c0 + 16, g0, g1, acc);
    } else {
      micro_tile<4, 1>(a, m0, c0, g0, g1, acc);
    }
  }
  switch (a.M - m0) {
    case 3:
      if (V == 4) {
        micro_tile<3, 2>(a, m0, c0, g0, g1, acc);
        micro_tile<3, 2>(a, m0, c0 + 16, g0, g1, acc);
      } else {
        micro_tile<3, 1>(a, m0, c0, g0, g1, acc);
      }
      break;
    case 2: micro_tile<2, V>(a, m0, c0, g0, g1, acc); break;
    case 1: micro_tile<1, V>(a, m0, c0, g0, g1, acc); break;
    default: break;
  }
}

}  // namespace

QC_AVX2 void gemm_columns_avx2(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1,
                               float* acc) {
  if (width == 32)
    rows_over_tile<4>(a, c0, g0, g1, acc);
  else
    rows_over_tile<1>(a, c0, g0, g1, acc);
}

// Dequantize: (code - zero) is exact in fp32, then one multiply by the scale, so the
// result is bitwise the reference's scales.float() * (codes - zeros).float().
QC_AVX2 void dequant_packed_row_avx2(const int32_t* qweight, const int32_t* qzeros,
                                     const void* scales, void* out, int64_t kp, int64_t N,
                                     int64_t group_size, int dtype) {
  const int64_t g = kp * 8 / group_size;  // group_size % 8 == 0: one group per packed row
  const __m256i low4 = _mm256_set1_epi32(0xF);
  for (int64_t c = 0; c < N; c += 8) {
    const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qweight + kp * N + c));
    const __m256 s = load_scales8(scales, dtype, g * N + c);
    const __m256 z = zeros8(qzeros[g * (N / 8) + c / 8]);
    for (int j = 0; j < 8; ++j) {
      const __m256i q = _mm256_and_si256(_mm256_srli_epi32(w, 4 * j), low4);
      const __m256 y = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(q), z), s);
      const int64_t o = (kp * 8 + j) * N + c;
      if (dtype == kFloat32) {
        _mm256_storeu_ps(static_cast<float*>(out) + o, y);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, y);
        uint16_t* dst = static_cast<uint16_t*>(out) + o;
        for (int i = 0; i < 8; ++i) dst[i] = float_to_bf16(tmp[i]);
      }
    }
  }
}

}  // namespace cpu
}  // namespace quant_cuda

#else  // not x86: detected_isa() is never kIsaAvx2, these are never called.
#include "cpu_kernels.h"
namespace quant_cuda {
namespace cpu {
void gemm_columns_avx2(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1, float* acc) {
  gemm_columns_scalar(a, c0, width, g0, g1, acc);
}
void dequant_packed_row_avx2(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                             void* out, int64_t kp, int64_t N, int64_t group_size, int dtype) {
  dequant_packed_row_scalar(qweight, qzeros, scales, out, kp, N, group_size, dtype);
}
}  // namespace cpu
}  // namespace quant_cuda
#endif
