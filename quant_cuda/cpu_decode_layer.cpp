// One decode position through a LLaMA-like decoder layer on the CPU, as two calls around the
// KV cache (kernels.h decode_qkv_cpu, decode_o_mlp_cpu), for bluelm_quant/cpu_decode.py.
// Torch-free.
//
// Why: at batch 1 a small model's decode step is mostly the work between its kernel calls.
// SmolLM2's compiled step spent ~4 ms of ~13 in the small ops inductor generates for each of
// its 30 layers (two RMSNorms, RoPE, the SiLU gate, residual adds, the views between them),
// each a call of its own, against ~5.5 ms in the 4-bit kernels. Here a layer is two calls
// whose vectors stay in the calling thread's scratch; the cache update and attention stay
// in Python between them (the model's own cache object and attention function: any cache
// class, any mask).
//
// The arithmetic is transformers' in fp32 (LlamaRMSNorm, apply_rotary_pos_emb with
// rotate_half, LlamaMLP with SiLU); sums run in other orders, so results agree to rounding.
#include <cmath>
#include <cstdint>

#include "cpu_kernels.h"
#include "kernels.h"
#if defined(__x86_64__) || defined(__i386__)
#include "cpu_avx512.h"
#endif

namespace quant_cuda {
namespace {

// y = weight * (x / sqrt(mean(x^2) + eps)); the mean of squares summed in double.
void rms_norm(const float* x, const float* weight, float eps, float* y, int64_t H) {
  double squares = 0.0;
  for (int64_t i = 0; i < H; ++i) squares += double(x[i]) * double(x[i]);
  const float inv = 1.0f / std::sqrt(float(squares / double(H)) + eps);
  for (int64_t i = 0; i < H; ++i) y[i] = weight[i] * (x[i] * inv);
}

// out = x * cos + rotate_half(x) * sin over one head of D values, rotate_half(x) = [-x2, x1].
void rope(const float* x, const float* cos, const float* sin, float* out, int64_t D) {
  const int64_t half = D / 2;
  for (int64_t d = 0; d < half; ++d) out[d] = x[d] * cos[d] + (-x[d + half]) * sin[d];
  for (int64_t d = half; d < D; ++d) out[d] = x[d] * cos[d] + x[d - half] * sin[d];
}

// act[i] = silu(gate[i]) * up[i], silu(g) = g * sigmoid(g); sigmoid from exp(-|g|) <= 1, so
// no exponential overflows.
void silu_mul_scalar(const float* gate, const float* up, float* act, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], e = std::exp(-std::fabs(g));
    const float sigmoid = g >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
    act[i] = g * sigmoid * up[i];
  }
}

#if defined(__x86_64__) || defined(__i386__)
using namespace cpu::avx512;

QC_AVX512 void silu_mul_avx512(const float* gate, const float* up, float* act, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = lane_mask(n - i);
    const __m512 g = _mm512_maskz_loadu_ps(m, gate + i);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __mmask16 negative = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 sigmoid = _mm512_div_ps(_mm512_mask_mov_ps(one, negative, e), _mm512_add_ps(one, e));
    _mm512_mask_storeu_ps(act + i, m, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid), _mm512_maskz_loadu_ps(m, up + i)));
  }
}
#endif

void silu_mul(const float* gate, const float* up, float* act, int64_t n) {
#if defined(__x86_64__) || defined(__i386__)
  if (cpu::active_isa() >= cpu::kIsaAvx512) return silu_mul_avx512(gate, up, act, n);
#endif
  silu_mul_scalar(gate, up, act, n);
}

int gemm(const Linear4bit& w, const float* x, float* out, int64_t M) {
  return gemm_4bit_cpu(x, w.qweight, w.qzeros, w.scales, w.perm, w.bias, out, M, w.K, w.N, w.group_size, kFloat32,
                       w.block);
}

}  // namespace

int decode_qkv_cpu(const float* x, const float* norm_weight, float eps, const Linear4bit& qkv, const float* cos,
                   const float* sin, int64_t cos_rows, float* q, float* k, float* v, int64_t B, int64_t H,
                   int64_t heads, int64_t kv_heads, int64_t D) {
  if (B < 1 || H < 1 || D < 2 || D % 2 || heads < 1 || kv_heads < 1 || qkv.K != H ||
      qkv.N != (heads + 2 * kv_heads) * D || (cos_rows != 1 && cos_rows != B))
    return kBadShape;
  const int64_t N = qkv.N;
  float* normed = cpu::scratch<float>(cpu::kSlotLayerA, B * H);
  float* y = cpu::scratch<float>(cpu::kSlotLayerB, B * N);
  for (int64_t b = 0; b < B; ++b) rms_norm(x + b * H, norm_weight, eps, normed + b * H, H);
  if (const int status = gemm(qkv, normed, y, B); status != kOk) return status;
  for (int64_t b = 0; b < B; ++b) {
    const float* c = cos + (cos_rows == 1 ? 0 : b) * D;
    const float* s = sin + (cos_rows == 1 ? 0 : b) * D;
    const float* row = y + b * N;
    for (int64_t h = 0; h < heads; ++h) rope(row + h * D, c, s, q + (b * heads + h) * D, D);
    for (int64_t h = 0; h < kv_heads; ++h) {
      rope(row + (heads + h) * D, c, s, k + (b * kv_heads + h) * D, D);
      const float* value = row + (heads + kv_heads + h) * D;
      float* dst = v + (b * kv_heads + h) * D;
      for (int64_t d = 0; d < D; ++d) dst[d] = value[d];
    }
  }
  return kOk;
}

int decode_o_mlp_cpu(const float* x, const float* attn, const Linear4bit& o, const float* norm_weight, float eps,
                     const Linear4bit& gate_up, const Linear4bit& down, float* out, int64_t B, int64_t H) {
  const int64_t I = down.K;
  if (B < 1 || H < 1 || o.N != H || gate_up.K != H || gate_up.N != 2 * I || down.N != H) return kBadShape;
  float* h = cpu::scratch<float>(cpu::kSlotLayerA, B * H);  // the residual stream after attention
  if (const int status = gemm(o, attn, h, B); status != kOk) return status;
  for (int64_t i = 0; i < B * H; ++i) h[i] += x[i];
  float* normed = cpu::scratch<float>(cpu::kSlotLayerB, B * H);
  for (int64_t b = 0; b < B; ++b) rms_norm(h + b * H, norm_weight, eps, normed + b * H, H);
  float* gu = cpu::scratch<float>(cpu::kSlotLayerC, B * 2 * I);
  if (const int status = gemm(gate_up, normed, gu, B); status != kOk) return status;
  float* act = cpu::scratch<float>(cpu::kSlotLayerB, B * I);  // `normed` is no longer needed
  for (int64_t b = 0; b < B; ++b) silu_mul(gu + b * 2 * I, gu + b * 2 * I + I, act + b * I, I);
  if (const int status = gemm(down, act, out, B); status != kOk) return status;
  for (int64_t i = 0; i < B * H; ++i) out[i] += h[i];
  return kOk;
}

}  // namespace quant_cuda
