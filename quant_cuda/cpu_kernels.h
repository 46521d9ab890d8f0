// Internal interface between the CPU entry points (cpu_kernels.cpp) and their SIMD
// (cpu_kernels_avx2.cpp) and scalar (cpu_kernels_scalar.cpp) bodies. Torch-free.
//
// Activation trick shared by both bodies: the kernels never shift nibbles down. Code j
// of a word (j < 7) is isolated in place with `word & (0xF << 4j)`, which as an int32
// equals q * 16^j exactly; the activation it meets was pre-scaled by 16^-j (an exact
// power-of-two scale), so the product is q * x. Nibble 7 would set the sign bit, so it
// is shifted down (>> 28, logical) and its activation is left unscaled.
#pragma once
#include <cstdint>
#include <cstring>

namespace quant_cuda {
namespace cpu {

struct GemmArgs {
  const float* x;        // [M, K] fp32, rows of qweight's order, pre-scaled as above
  const float* xsum;     // [M, G] sum of the unscaled activations of each group
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;    // [G, N] fp32 or bf16 (dtype)
  const void* bias;      // [N] or nullptr
  void* out;             // [M, N], dtype
  int64_t M, K, N, G, group_size;
  int dtype;
};

// Scale applied to the activation met by nibble j (see the comment at the top).
inline float nibble_scale(int j) { return j == 7 ? 1.0f : 1.0f / float(1 << (4 * j)); }

// Adds groups [g0, g1) of columns [c0, c0 + width) to the fp32 accumulator acc [M, N]
// for all M rows; width is 8 or 32. The entry point writes `out` from acc at the end.
void gemm_columns_avx2(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1, float* acc);
void gemm_columns_scalar(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1, float* acc);

// Rows [8 * kp, 8 * kp + 8) of the dequantized W^T [K, N].
void dequant_packed_row_avx2(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                             void* out, int64_t kp, int64_t N, int64_t group_size, int dtype);
void dequant_packed_row_scalar(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                               void* out, int64_t kp, int64_t N, int64_t group_size, int dtype);

bool cpu_has_avx2_fma();
// "avx2+fma" or "scalar": the body the entry points dispatch to on this CPU.
const char* cpu_isa();
// OpenMP threads for the next calls (bindings.cpp passes at::get_num_threads()); <= 0: default.
void set_cpu_threads(int n);

// bf16 <-> fp32. Rounding is to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN.
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

}  // namespace cpu
}  // namespace quant_cuda
