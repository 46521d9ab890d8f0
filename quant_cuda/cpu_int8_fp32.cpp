// fp32 bodies of the int8 GEMM (cpu_int8.cpp) for CPUs without AVX-512 VNNI: AVX2 + FMA
// (target attribute, like cpu_kernels_avx2.cpp: no std templates here) and scalar. The
// int8 weights convert to float exactly; each output is an fp32 dot product over K, then
// one multiply by the row's scale.
#include <cstdint>

#include "cpu_kernels.h"
#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define QC_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace quant_cuda {
namespace cpu {

namespace {
inline float load_f(const void* p, int dtype, int64_t i) {
  return dtype == kFloat32 ? static_cast<const float*>(p)[i] : bf16_to_float(static_cast<const uint16_t*>(p)[i]);
}

// out[m, n] = dot * scale[n] (+ bias[n]) in the output dtype.
inline void store_out(const Int8Args& a, int64_t m, int64_t n, float dot) {
  float y = dot * load_f(a.scale, a.dtype, n);
  if (a.bias) y += load_f(a.bias, a.dtype, n);
  if (a.dtype == kFloat32)
    static_cast<float*>(a.out)[m * a.N + n] = y;
  else
    static_cast<uint16_t*>(a.out)[m * a.N + n] = float_to_bf16(y);
}
}  // namespace

void gemm_int8_rows_scalar(const Int8Args& a, int64_t n0, int64_t n1) {
  for (int64_t m = 0; m < a.M; ++m) {
    const float* x = a.x + m * a.K;
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* w = a.weight + n * a.K;
      float dot = 0.0f;
      for (int64_t k = 0; k < a.K; ++k) dot += float(w[k]) * x[k];
      store_out(a, m, n, dot);
    }
  }
}

#if defined(__x86_64__) || defined(__i386__)
namespace {
QC_AVX2 inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Rows n.. n+R-1 against one activation row: R accumulators share each load of x.
template <int R>
QC_AVX2 void rows_dot(const Int8Args& a, int64_t m, int64_t n) {
  const int64_t K = a.K;
  const float* x = a.x + m * K;
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) {
      const __m128i w8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(a.weight + (n + r) * K + k));
      acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(w8)), xv, acc[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    float dot = hsum8(acc[r]);
    for (int64_t j = k; j < K; ++j) dot += float(a.weight[(n + r) * K + j]) * x[j];
    store_out(a, m, n + r, dot);
  }
}
}  // namespace

QC_AVX2 void gemm_int8_rows_avx2(const Int8Args& a, int64_t n0, int64_t n1) {
  for (int64_t nb = n0; nb < n1; nb += 16) {  // 16 rows' weights stay in cache across m
    const int64_t n_end = nb + 16 < n1 ? nb + 16 : n1;
    for (int64_t m = 0; m < a.M; ++m) {
      int64_t n = nb;
      for (; n + 4 <= n_end; n += 4) rows_dot<4>(a, m, n);
      for (; n < n_end; ++n) rows_dot<1>(a, m, n);
    }
  }
}
#else  // not x86: detected_isa() is never kIsaAvx2.
void gemm_int8_rows_avx2(const Int8Args& a, int64_t n0, int64_t n1) { gemm_int8_rows_scalar(a, n0, n1); }
#endif

}  // namespace cpu
}  // namespace quant_cuda
