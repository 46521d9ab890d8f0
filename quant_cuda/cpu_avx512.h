// Helpers shared by the AVX-512 code (cpu_kernels_avx512.cpp, cpu_int8_avx512.cpp,
// cpu_attention.cpp, cpu_decode_layer.cpp); include only from those files. Everything here
// carries the target attribute (see the file comments there for why nothing is compiled with
// -mavx512*).
#pragma once
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>

#include <cstdint>

#include "cpu_kernels.h"
#include "kernels.h"

#define QC_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// GCC 12's own avx512fintrin.h trips these warnings: its intrinsics pass the deliberately
// uninitialised _mm512_undefined_*() as the unused merge operand.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// The register tiles are small arrays of vectors indexed by loop counters. Unless every
// such loop is unrolled, GCC keeps the arrays in memory and stores all accumulators to
// the stack on every iteration (seen in the disassembly).
#if defined(__clang__)
#define QC_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
#define QC_UNROLL _Pragma("GCC unroll 16")
#else
#define QC_UNROLL
#endif

namespace quant_cuda {
namespace cpu {
namespace avx512 {

// acc += sum over each 4 bytes of u8 (unsigned) * s8 (signed), in place (vpdpbusd). GCC 12
// compiles _mm512_dpbusd_epi32 in loops with many live accumulators into a copy of the
// accumulator to a scratch register and back around every dot product (seen in the
// disassembly of both kernels); the asm keeps the accumulator where it is.
QC_AVX512 inline void dpbusd(__m512i& acc, __m512i u8, __m512i s8) {
  __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u8), "vm"(s8));
}

// ---- the activation grid (cpu_kernels.h) ----------------------------------------------

inline __mmask16 lane_mask(int64_t left) {
  return left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : __mmask16(0);
}

// max |x| over x[0, n); NaN when any element is NaN or infinite.
QC_AVX512 inline float max_abs(const float* x, int64_t n) {
  const __m512 big = _mm512_set1_ps(3.4028234663852886e38f);  // FLT_MAX
  __m512 mx = _mm512_setzero_ps();
  __mmask16 finite = 0xFFFF;
  for (int64_t r = 0; r < n; r += 16) {
    const __m512 v = _mm512_abs_ps(_mm512_maskz_loadu_ps(lane_mask(n - r), x + r));
    finite &= _mm512_cmp_ps_mask(v, big, _CMP_LE_OQ);  // false for inf and NaN
    mx = _mm512_max_ps(mx, v);
  }
  return finite == 0xFFFF ? _mm512_reduce_max_ps(mx) : __builtin_nanf("");
}

// q = round(x * inv) for 16 elements (mask: those to load; the rest are 0), in double:
// exact to far below half a step, so the only error is the rounding to the grid.
// inv = kActMax / max|x|.
QC_AVX512 inline __m512i grid16(const float* x, __mmask16 mask, __m512d inv) {
  const __m512 v = _mm512_maskz_loadu_ps(mask, x);
  const __m256 lo = _mm512_castps512_ps256(v);
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  constexpr int kNearest = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256i qlo = _mm512_cvt_roundpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(lo), inv), kNearest);
  const __m256i qhi = _mm512_cvt_roundpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(hi), inv), kNearest);
  const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(qlo), qhi, 1);
  return _mm512_min_epi32(_mm512_max_epi32(q, _mm512_set1_epi32(-kActMax)), _mm512_set1_epi32(kActMax));
}

// q = 65536 a + 256 b + c with balanced digits in [-128, 127] (|q| <= kActMax): c is q's
// low byte read as signed, and so on up.
QC_AVX512 inline void digits16(__m512i q, __m512i& a, __m512i& b, __m512i& c) {
  c = _mm512_srai_epi32(_mm512_slli_epi32(q, 24), 24);
  const __m512i q1 = _mm512_srai_epi32(_mm512_sub_epi32(q, c), 8);
  b = _mm512_srai_epi32(_mm512_slli_epi32(q1, 24), 24);
  a = _mm512_srai_epi32(_mm512_sub_epi32(q1, b), 8);
}

// ---- loads and stores in the kernels' dtypes --------------------------------------------

QC_AVX512 inline __m512 load16(const void* p, int dtype, int64_t offset, __mmask16 mask) {
  if (dtype == kFloat32) return _mm512_maskz_loadu_ps(mask, static_cast<const float*>(p) + offset);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(p) + offset);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// bf16 rounding as float_to_bf16 (cpu_kernels.h): nearest even, NaN stays a quiet NaN.
QC_AVX512 inline void store16(void* p, int dtype, int64_t offset, __m512 y, __mmask16 mask) {
  if (dtype == kFloat32) return _mm512_mask_storeu_ps(static_cast<float*>(p) + offset, mask, y);
  const __m512i u = _mm512_castps_si512(y);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb)), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
  _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p) + offset, mask, _mm512_cvtepi32_epi16(r));
}

// True zeros (stored + 1) of 16 columns as floats: two qzeros words, 8 nibbles each (one
// word when only the low 8 columns are in the layer).
QC_AVX512 inline __m512 zeros16(const int32_t* p, __mmask16 mask) {
  const __m128i words = _mm_maskz_loadu_epi32((mask & 0xFF00) ? 3 : 1, p);
  const __m512i lanes = _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(words, words));  // lane i: byte i / 2
  const __m512i shifts = _mm512_setr_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
  const __m512i z = _mm512_and_si512(_mm512_srlv_epi32(lanes, shifts), _mm512_set1_epi32(0xF));
  return _mm512_cvtepi32_ps(_mm512_add_epi32(z, _mm512_set1_epi32(1)));
}

// exp(x) for x <= 0 (a softmax score minus the maximum; silu's -|x|), 16 lanes: Cephes' expf (range reduction by
// ln 2 in two parts, a degree-6 polynomial, scaling by 2^n), within 2 ulp of expf; -inf and
// anything below the smallest normal's logarithm give 0, NaN stays NaN.
QC_AVX512 inline __m512 exp16(__m512 x) {
  const __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.3f), _CMP_LT_OQ);
  const __m512 xc = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  const __m512 y = _mm512_maskz_mov_ps(~tiny, _mm512_scalef_ps(p, n));
  return _mm512_mask_mov_ps(y, nan, x);
}

}  // namespace avx512
}  // namespace cpu
}  // namespace quant_cuda
#endif
