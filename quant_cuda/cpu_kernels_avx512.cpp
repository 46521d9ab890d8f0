// AVX-512 VNNI body of the 4-bit CPU GEMM (x86-64 with AVX-512 F/BW/VL and VNNI:
// Intel Ice Lake / Sapphire Rapids and later, AMD Zen 4 and later). Compiled without
// -mavx512*: every function carries a target attribute, so the rest of the extension stays
// baseline x86-64 and the .so loads on any CPU; cpu_isa.cpp enables this body only when
// the CPU and OS support it. For the same reason this file must not instantiate std
// templates (they would be emitted as AVX-512 code that the linker may pick for other
// files).
//
// Why integers: the fp32 paths spend three instructions per 16 weights (isolate the
// nibble, convert to float, FMA) and were compute-bound at half the memory bandwidth.
// vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds each 4 products into
// 16 int32 lanes, so the 4-bit codes need no conversion: per 64 bytes of qweight (128
// weights) the loop does 3 instructions to split the low and high nibbles of every byte
// and 6 dot products (2 nibble halves x 3 activation digits, see cpu_kernels.h).
//
// Layout: qweight[kp][c] packs rows 8kp..8kp+7 of column c; byte i holds rows 2i (low
// nibble) and 2i+1 (high). So a zmm of 16 columns, masked to the low nibbles, meets
// activation rows 0,2,4,6 of the packed row in each lane, and the high nibbles meet rows
// 1,3,5,7: the activation digits are stored in exactly that order, 4 bytes broadcast to
// all lanes. Integer sums are exact; each group is folded into fp32 once:
//   acc += scale * xscale * ((65536 A + 256 B + C) - zero * sum(q)),
// A, B, C the group's dot products with digits a, b, c.
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_avx512.h"

namespace quant_cuda {
namespace cpu {

using namespace avx512;

namespace {

// ---- weights --------------------------------------------------------------------------

// One group of MR rows x V*16 columns (c.. ; mask[v] marks the columns inside the layer):
// adds the group's contribution to acc. 3*MR*V int32 accumulators and 2V nibble vectors
// must fit the 32 zmm registers with room to spare: (1, 4) for M = 1, (<= 4, 1)
// otherwise. (4, 2) would need 24 accumulators, and GCC then spills them every iteration.
template <int MR, int V>
QC_AVX512 void group_tile(const GemmArgs& a, int64_t m0, int64_t c, int64_t g, const __mmask16* mask, float* acc) {
  const int64_t N = a.N, ld = qweight_stride(a), kp0 = g * a.group_size / 8;
  const int64_t kp1 = (g + 1) * a.group_size / 8 < a.K / 8 ? (g + 1) * a.group_size / 8 : a.K / 8;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512i s[3][MR][V];
  QC_UNROLL
  for (int d = 0; d < 3; ++d)
    QC_UNROLL
    for (int m = 0; m < MR; ++m)
      QC_UNROLL
      for (int v = 0; v < V; ++v) s[d][m][v] = _mm512_setzero_si512();

  // M = 1 reads each weight once, at the memory's pace: ask for the same columns of the
  // next group now (one sweep of the chunk ahead: ~32 KB for a 512-column chunk, 64-176 KB
  // for a whole column block, which then continues the same sequential stream). Measured on 4096 x
  // 11008 / 11008 x 4096, cold weights, loaded machine: median 1.5-3.9x faster than relying
  // on the hardware prefetchers alone. Into L2 (T1), not L1: a sweep ahead is as large as
  // L1 (48 KB here), which T0 lines then leave early. With the weights on huge pages
  // (huge_pages.py), 2 threads, 10 rounds of separate processes alternating: 4096 x 11008
  // median 13.1 -> 14.1 GB/s (T1 ahead in 8 of 10), 11008 x 4096 17.1 -> 18.1 (6 of 10); two
  // groups ahead: no better than one; NTA: 2.5x slower.
  const bool prefetch = MR == 1 && g + 1 < a.G;
  const int32_t* w0 = qweight_column(a, c);
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    const int32_t* wp = w0 + kp * ld;
    if (prefetch) {
      const char* next = reinterpret_cast<const char*>(wp + a.group_size / 8 * ld);
      QC_UNROLL
      for (int v = 0; v < V; ++v) _mm_prefetch(next + 64 * v, _MM_HINT_T1);
    }
    __m512i lo[V], hi[V];
    QC_UNROLL
    for (int v = 0; v < V; ++v) {
      const __m512i w = _mm512_maskz_loadu_epi32(mask[v], wp + 16 * v);
      lo[v] = _mm512_and_si512(w, low4);
      hi[v] = _mm512_and_si512(_mm512_srli_epi32(w, 4), low4);
    }
    QC_UNROLL
    for (int m = 0; m < MR; ++m) {
      const int8_t* xp = a.xq + (m0 + m) * a.K * 3 + kp * 24;
      QC_UNROLL
      for (int d = 0; d < 3; ++d) {
        int32_t even, odd;
        std::memcpy(&even, xp + 8 * d, 4);
        std::memcpy(&odd, xp + 8 * d + 4, 4);
        const __m512i xe = _mm512_set1_epi32(even), xo = _mm512_set1_epi32(odd);
        QC_UNROLL
        for (int v = 0; v < V; ++v) {
          dpbusd(s[d][m][v], lo[v], xe);
          dpbusd(s[d][m][v], hi[v], xo);
        }
      }
    }
  }

  QC_UNROLL
  for (int v = 0; v < V; ++v) {
    if (!mask[v]) continue;
    const int64_t col = c + 16 * v;
    const __m512 scale = load16(a.scales, a.dtype, g * N + col, mask[v]);
    const __m512 zero = zeros16(a.qzeros + g * (N / 8) + col / 8, mask[v]);
    QC_UNROLL
    for (int m = 0; m < MR; ++m) {
      const int64_t row = m0 + m;
      // 65536 A + 256 B + C: each conversion is exact (|A|, |B|, |C| < 2^24).
      __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[1][m][v]), _mm512_set1_ps(256.0f),
                                 _mm512_cvtepi32_ps(s[2][m][v]));
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[0][m][v]), _mm512_set1_ps(65536.0f), t);
      t = _mm512_fnmadd_ps(zero, _mm512_set1_ps(a.xsum[row * a.G + g]), t);
      float* ap = acc + row * N + col;
      const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(a.xscale[row * a.G + g]));
      _mm512_mask_storeu_ps(ap, mask[v], _mm512_fmadd_ps(step, t, _mm512_maskz_loadu_ps(mask[v], ap)));
    }
  }
}


// All rows over 16 columns: blocks of 4 rows, then the remainder.
QC_AVX512 void rows_over_columns(const GemmArgs& a, int64_t c, int64_t g, const __mmask16* mask, float* acc) {
  int64_t m0 = 0;
  for (; m0 + 4 <= a.M; m0 += 4) group_tile<4, 1>(a, m0, c, g, mask, acc);
  switch (a.M - m0) {
    case 3: group_tile<3, 1>(a, m0, c, g, mask, acc); break;
    case 2: group_tile<2, 1>(a, m0, c, g, mask, acc); break;
    case 1: group_tile<1, 1>(a, m0, c, g, mask, acc); break;
    default: break;
  }
}

}  // namespace

QC_AVX512 void activation_digits_avx512(const float* x, int64_t K, int64_t group_size, const DigitLayout& out,
                                        float* xscale, float* xsum) {
  // Lanes in the order 0,2,4,6,1,3,5,7 within each 8 (the packed row's nibble order).
  const __m512i even_odd = _mm512_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15);
  for (int64_t r0 = 0, g = 0; r0 < K; r0 += group_size, ++g) {
    const int64_t r1 = r0 + group_size < K ? r0 + group_size : K;
    const float maxabs = max_abs(x + r0, r1 - r0);
    const bool zero = !(maxabs > 0.0f);  // all zero; or NaN/inf, which poisons the group's outputs
    const __m512d inv = _mm512_set1_pd(zero ? 0.0 : double(kActMax) / double(maxabs));
    xscale[g] = zero ? (maxabs == 0.0f ? 0.0f : maxabs) : float(double(maxabs) / double(kActMax));
    __m512i sa = _mm512_setzero_si512(), sb = sa, sc = sa;  // digit sums: sum(q) exactly
    for (int64_t r = r0; r < r1; r += 16) {  // 2 packed rows (1 at the group's end when 8 are left)
      const __mmask16 mask = lane_mask(r1 - r);
      __m512i a, b, c;
      digits16(_mm512_permutexvar_epi32(even_odd, grid16(x + r, mask, inv)), a, b, c);
      sa = _mm512_add_epi32(sa, a);
      sb = _mm512_add_epi32(sb, b);
      sc = _mm512_add_epi32(sc, c);
      const __m128i da = _mm512_cvtepi32_epi8(a), db = _mm512_cvtepi32_epi8(b), dc = _mm512_cvtepi32_epi8(c);
      int8_t* dst = out.at(r / 8);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), da);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + out.digit_stride), db);
      _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + 2 * out.digit_stride), dc);
      if (mask == 0xFFFF) {
        dst = out.at(r / 8 + 1);
        _mm_storeh_pd(reinterpret_cast<double*>(dst), _mm_castsi128_pd(da));
        _mm_storeh_pd(reinterpret_cast<double*>(dst + out.digit_stride), _mm_castsi128_pd(db));
        _mm_storeh_pd(reinterpret_cast<double*>(dst + 2 * out.digit_stride), _mm_castsi128_pd(dc));
      }
    }
    xsum[g] = float(65536.0 * _mm512_reduce_add_epi32(sa) + 256.0 * _mm512_reduce_add_epi32(sb) +
                    double(_mm512_reduce_add_epi32(sc)));
  }
}

QC_AVX512 void gemm_chunk_avx512(const GemmArgs& a, int64_t c0, int64_t c1, float* acc) {
  // Groups outermost: the chunk's columns are swept once per group, 64 at a time, which
  // reads the group's 16 (group_size / 8) qweight rows as sequential streams.
  for (int64_t g = 0; g < a.G; ++g) {
    for (int64_t c = c0; c < c1; c += 64) {
      const __mmask16 mask[4] = {lane_mask(c1 - c), lane_mask(c1 - c - 16), lane_mask(c1 - c - 32),
                                 lane_mask(c1 - c - 48)};
      if (a.M == 1) {
        group_tile<1, 4>(a, 0, c, g, mask, acc);
      } else {  // the 4 KB of weights a tile reads per group stay in L1 across row blocks
        for (int v = 0; v < 4 && mask[v]; ++v) rows_over_columns(a, c + 16 * v, g, mask + v, acc);
      }
    }
  }
  store_chunk_avx512(a, c0, c1, acc);
}

QC_AVX512 void store_chunk_avx512(const GemmArgs& a, int64_t c0, int64_t c1, const float* acc) {
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 mask = lane_mask(c1 - c);
      __m512 y = _mm512_maskz_loadu_ps(mask, acc + m * a.N + c);
      if (a.bias) y = _mm512_add_ps(y, load16(a.bias, a.dtype, c, mask));
      store16(a.out, a.dtype, m * a.N + c, y, mask);
    }
  }
}

}  // namespace cpu
}  // namespace quant_cuda

#else  // not x86: detected_isa() is never kIsaAvx512, these are never called.
#include "cpu_kernels.h"
namespace quant_cuda {
namespace cpu {
void activation_digits_avx512(const float*, int64_t, int64_t, const DigitLayout&, float*, float*) {}
void gemm_chunk_avx512(const GemmArgs&, int64_t, int64_t, float*) {}
void store_chunk_avx512(const GemmArgs&, int64_t, int64_t, const float*) {}
}  // namespace cpu
}  // namespace quant_cuda
#endif
