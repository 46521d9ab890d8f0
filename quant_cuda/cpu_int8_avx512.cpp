// AVX-512 VNNI body of the int8 GEMM (cpu_int8.cpp), for the quantized lm_head.
//
// A zmm of weights is 64 consecutive k of one output row. vpdpbusd wants one unsigned
// operand: the weights become w + 128 (xor 0x80) and meet the three signed digit planes
// of the activation row (cpu_kernels.h); adding -128 * the lane sums of each plane leaves
// exactly sum(w * digit) per lane. Four rows share each load of the activation digits
// (12 accumulators: GCC keeps them in registers). The 16 lanes of 16 rows are then summed
// with one transpose-and-add tree instead of 16 separate horizontal sums. Compiled
// without -mavx512*, like cpu_kernels_avx512.cpp.
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_avx512.h"

namespace quant_cuda {
namespace cpu {

using namespace avx512;

namespace {

// Lanes 0..7: pair sums of a's lanes; 8..15: of b's.
QC_AVX512 inline __m512 fold(__m512 a, __m512 b) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return _mm512_add_ps(_mm512_permutex2var_ps(a, even, b), _mm512_permutex2var_ps(a, odd, b));
}

// Lane r = the sum of the 16 lanes of t[r] (t: 16 x 16 floats). Each level halves the
// vectors and keeps rows in order: 8 lanes per row, then 4, 2, 1.
QC_AVX512 inline __m512 row_sums16(const float* t) {
  __m512 v[8];
  QC_UNROLL
  for (int i = 0; i < 8; ++i) v[i] = fold(_mm512_load_ps(t + 32 * i), _mm512_load_ps(t + 32 * i + 16));
  QC_UNROLL
  for (int i = 0; i < 4; ++i) v[i] = fold(v[2 * i], v[2 * i + 1]);
  QC_UNROLL
  for (int i = 0; i < 2; ++i) v[i] = fold(v[2 * i], v[2 * i + 1]);
  return fold(v[0], v[1]);
}

// t[r] (16 lanes, r < R) = per-lane sums of w * q for weight rows n.. n+R-1 and activation
// row m, q = 65536 a + 256 b + c, in fp32 (the int32 lane sums are exact).
template <int R>
QC_AVX512 void rows_dot(const Int8Args& a, int64_t m, int64_t n, float* t) {
  const int64_t K = a.K, Kp = a.Kp;
  const int8_t* xa = a.xq + m * 3 * Kp;
  const int32_t* init = a.xinit + m * 48;
  const __m512i flip = _mm512_set1_epi8(char(0x80));
  __m512i s[3][R];
  QC_UNROLL
  for (int d = 0; d < 3; ++d)
    QC_UNROLL
    for (int r = 0; r < R; ++r) s[d][r] = _mm512_setzero_si512();

  for (int64_t k = 0; k < K; k += 64) {
    // The digits are zero-padded to Kp; the weight row must not be read past K.
    const __mmask64 mask = K - k >= 64 ? ~0ull : (~0ull) >> (64 - (K - k));
    const __m512i da = _mm512_loadu_si512(xa + k), db = _mm512_loadu_si512(xa + Kp + k),
                  dc = _mm512_loadu_si512(xa + 2 * Kp + k);
    QC_UNROLL
    for (int r = 0; r < R; ++r) {
      const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mask, a.weight + (n + r) * K + k), flip);
      dpbusd(s[0][r], w, da);
      dpbusd(s[1][r], w, db);
      dpbusd(s[2][r], w, dc);
    }
  }
  QC_UNROLL
  for (int d = 0; d < 3; ++d)
    QC_UNROLL
    for (int r = 0; r < R; ++r) s[d][r] = _mm512_add_epi32(s[d][r], _mm512_loadu_si512(init + 16 * d));
  QC_UNROLL
  for (int r = 0; r < R; ++r) {
    __m512 v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[1][r]), _mm512_set1_ps(256.0f), _mm512_cvtepi32_ps(s[2][r]));
    v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0][r]), _mm512_set1_ps(65536.0f), v);
    _mm512_store_ps(t + 16 * r, v);
  }
}

// Lane sums of 64 digits at a time: vpdpbusd with all-ones as the unsigned operand.
QC_AVX512 void plane_init(const int8_t* plane, int64_t Kp, int32_t* init) {
  const __m512i ones = _mm512_set1_epi8(1);
  __m512i acc = _mm512_setzero_si512();
  for (int64_t k = 0; k < Kp; k += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(plane + k));
  _mm512_storeu_si512(init, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(acc, 7)));
}

}  // namespace

QC_AVX512 void int8_activation_avx512(const float* x, int64_t K8, int64_t Kp, int8_t* planes, int32_t* init,
                                      float* xscale) {
  const float maxabs = max_abs(x, K8);
  const bool zero = !(maxabs > 0.0f);  // all zero; or NaN/inf, which makes the whole output row NaN
  const __m512d inv = _mm512_set1_pd(zero ? 0.0 : double(kActMax) / double(maxabs));
  *xscale = zero ? (maxabs == 0.0f ? 0.0f : maxabs) : float(double(maxabs) / double(kActMax));
  for (int64_t k = 0; k < Kp; k += 16) {  // zero digits past K8: the planes are padded to Kp
    const __mmask16 mask = lane_mask(K8 - k);
    __m512i a, b, c;
    digits16(zero ? _mm512_setzero_si512() : grid16(x + k, mask, inv), a, b, c);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + k), _mm512_cvtepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + Kp + k), _mm512_cvtepi32_epi8(b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(planes + 2 * Kp + k), _mm512_cvtepi32_epi8(c));
  }
  for (int d = 0; d < 3; ++d) plane_init(planes + d * Kp, Kp, init + 16 * d);
}

QC_AVX512 void gemm_int8_rows_avx512(const Int8Args& a, int64_t n0, int64_t n1) {
  alignas(64) float t[16 * 16];
  for (int64_t nb = n0; nb < n1; nb += 16) {
    const int64_t rows = n1 - nb < 16 ? n1 - nb : 16;
    const __mmask16 mask = lane_mask(rows);
    const __m512 scale = load16(a.scale, a.dtype, nb, mask);
    const __m512 bias = a.bias ? load16(a.bias, a.dtype, nb, mask) : _mm512_setzero_ps();
    for (int64_t m = 0; m < a.M; ++m) {  // the block's weights (16 rows) stay in L1/L2 across m
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4) rows_dot<4>(a, m, nb + r, t + 16 * r);
      for (; r < rows; ++r) rows_dot<1>(a, m, nb + r, t + 16 * r);
      for (; r < 16; ++r) _mm512_store_ps(t + 16 * r, _mm512_setzero_ps());
      const __m512 y = _mm512_mul_ps(_mm512_mul_ps(row_sums16(t), _mm512_set1_ps(a.xscale[m])), scale);
      store16(a.out, a.dtype, m * a.N + nb, _mm512_add_ps(y, bias), mask);
    }
  }
}

}  // namespace cpu
}  // namespace quant_cuda

#else  // not x86: detected_isa() is never kIsaAvx512, these are never called.
#include "cpu_kernels.h"
namespace quant_cuda {
namespace cpu {
void int8_activation_avx512(const float*, int64_t, int64_t, int8_t*, int32_t*, float*) {}
void gemm_int8_rows_avx512(const Int8Args&, int64_t, int64_t) {}
}  // namespace cpu
}  // namespace quant_cuda
#endif
