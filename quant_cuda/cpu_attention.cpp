// Single-position decode attention on the CPU (kernels.h decode_attention_cpu), for
// bluelm_quant/cpu_attention.py. Torch-free.
//
// Why an op of its own: a batch-1 decode step attends one query position per head over the
// KV cache. As two matrix products (torch's bmm) that is ~20 us a call at SmolLM2's size,
// almost all of it BLAS dispatch, twice a layer: 1.6 ms of a 12-14 ms SmolLM2 step. Here it is
// a few dot products and one pass over the values. Masked positions (a static cache's unfilled
// slots, padding) are skipped outright, so a long preallocated cache costs what its filled
// part costs.
//
// Dispatch: an AVX-512 body (explicit vector code: dot products, exponentials and the weighted
// sum of the values, 16 lanes at a time) where the CPU body in use is AVX-512 or AMX
// (cpu_isa.cpp, so forcing an ISA for testing covers it too), a scalar body elsewhere (expf
// per unmasked position). The scores live in the calling thread's scratch (thread_scratch):
// no allocation per call.
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"
#include "kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_avx512.h"
#endif

namespace quant_cuda {
namespace {

// Softmax over scores[0, T) (masked positions hold -inf) into weights, as torch computes it:
// subtract the maximum, exp, divide by the sum (the division is left to the caller: returns
// the sum). Every position masked: the maximum is -inf and the weights NaN, as SDPA's.
float softmax_weights(float* scores, int64_t T, float best) {
  float total = 0.0f;
  for (int64_t t = 0; t < T; ++t) {
    const float p = scores[t] == -INFINITY && best != -INFINITY ? 0.0f : std::exp(scores[t] - best);
    scores[t] = p;
    total += p;
  }
  return total;
}

float score(float dot, const float* add, int64_t t, float scale) { return dot * scale + (add ? add[t] : 0.0f); }

// One query head [D] over its key/value head [T, D]: out [D]. scores: [T] scratch.
void attend_head_scalar(const float* q, const float* k, const float* v, const uint8_t* keep, const float* add,
                        float* out, float* scores, int64_t T, int64_t D, float scale) {
  float best = -INFINITY;
  for (int64_t t = 0; t < T; ++t) {
    if (keep && !keep[t]) {
      scores[t] = -INFINITY;
      continue;
    }
    float dot = 0.0f;
    for (int64_t d = 0; d < D; ++d) dot += q[d] * k[t * D + d];
    scores[t] = score(dot, add, t, scale);
    if (scores[t] > best || std::isnan(scores[t])) best = scores[t];
  }
  const float inv = 1.0f / softmax_weights(scores, T, best);
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  for (int64_t t = 0; t < T; ++t)
    if (scores[t] != 0.0f)  // masked or negligible: its values are not read
      for (int64_t d = 0; d < D; ++d) out[d] += scores[t] * v[t * D + d];
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

#if defined(__x86_64__) || defined(__i386__)
using namespace cpu::avx512;

// softmax_weights with 16 exponentials at a time (the sum in 16 lanes, then across them).
QC_AVX512 float softmax_weights_avx512(float* scores, int64_t T, float best) {
  const __m512 m = _mm512_set1_ps(best);
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < T; t += 16) {
    const __mmask16 lanes = lane_mask(T - t);
    const __m512 p = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, scores + t), m));
    _mm512_mask_storeu_ps(scores + t, lanes, p);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(lanes, p));
  }
  return _mm512_reduce_add_ps(total);
}

QC_AVX512 void attend_head_avx512(const float* q, const float* k, const float* v, const uint8_t* keep,
                                  const float* add, float* out, float* scores, int64_t T, int64_t D, float scale) {
  float best = -INFINITY;
  for (int64_t t = 0; t < T; ++t) {
    if (keep && !keep[t]) {
      scores[t] = -INFINITY;
      continue;
    }
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      const __mmask16 m = lane_mask(D - d);
      acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), _mm512_maskz_loadu_ps(m, k + t * D + d), acc);
    }
    scores[t] = score(_mm512_reduce_add_ps(acc), add, t, scale);
    if (scores[t] > best || std::isnan(scores[t])) best = scores[t];
  }
  const float inv = 1.0f / softmax_weights_avx512(scores, T, best);
  // out = sum_t p_t v_t / sum_t p_t, 64 values at a time with the sums in registers (a sum
  // kept in memory would chain every position through a store and a load).
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const __mmask16 m[4] = {lane_mask(D - d0), lane_mask(D - d0 - 16), lane_mask(D - d0 - 32), lane_mask(D - d0 - 48)};
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t t = 0; t < T; ++t) {
      if (scores[t] == 0.0f) continue;  // masked or negligible: its values are not read
      const __m512 p = _mm512_set1_ps(scores[t]);
      const float* vt = v + t * D + d0;
      QC_UNROLL
      for (int j = 0; j < 4; ++j) acc[j] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(m[j], vt + 16 * j), acc[j]);
    }
    QC_UNROLL
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(out + d0 + 16 * j, m[j], _mm512_mul_ps(acc[j], _mm512_set1_ps(inv)));
  }
}
#endif

}  // namespace

int decode_attention_cpu(const float* q, const float* k, const float* v, const uint8_t* keep, const float* add,
                         float* out, int64_t B, int64_t H, int64_t KVH, int64_t T, int64_t D, float scale) {
  if (B < 1 || H < 1 || KVH < 1 || H % KVH != 0 || T < 1 || D < 1) return kBadShape;
  float* scores = cpu::scratch<float>(cpu::kSlotScores, T);
  const int64_t group = H / KVH;
#if defined(__x86_64__) || defined(__i386__)
  const auto head = cpu::active_isa() >= cpu::kIsaAvx512 ? attend_head_avx512 : attend_head_scalar;
#else
  const auto head = attend_head_scalar;
#endif
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kv = (b * KVH + h / group) * T * D;
      head(q + (b * H + h) * D, k + kv, v + kv, keep ? keep + b * T : nullptr, add ? add + b * T : nullptr,
           out + (b * H + h) * D, scores, T, D, scale);
    }
  }
  return kOk;
}

}  // namespace quant_cuda
