// CPU entry point of the int8 GEMM (kernels.h gemm_int8_cpu): the weight-only int8
// lm_head of bluelm_quant.placement.Int8Linear. Bodies: cpu_int8_avx512.cpp (VNNI) and
// cpu_int8_fp32.cpp (AVX2 + FMA, scalar), picked like the 4-bit ones (cpu_isa.cpp).
//
// Work split: tasks of kRowsPerTask output rows (N), claimed by the pool threads. Each
// output is one task's dot product in a fixed order, so results do not depend on the
// thread count.
#include <algorithm>

#include "cpu_kernels.h"
#include "cpu_threads.h"
#include "kernels.h"

namespace quant_cuda {
namespace cpu {
namespace {

// 256 rows: 147 KB of weights per task for SmolLM2's 576-wide head (192 tasks), 1 MB for
// a 4096-wide one; enough tasks to balance, few enough to keep the hand-out cheap.
constexpr int64_t kRowsPerTask = 256;
constexpr int64_t kPrologueRows = 4;

struct Prologue {
  const void* x;
  int64_t M, K, stride, Kp;  // stride: of xf rows (AVX-512: K rounded up to 8, zero padded)
  int dtype;
  bool avx512;
  float* xf;  // [M, stride] fp32 copy of x (bf16 input, or AVX-512 with K % 8 != 0), else null
  int8_t* xq;
  int32_t* xinit;
  float* xscale;
};

void prologue_task(void* ctx, int64_t task) {
  const Prologue& p = *static_cast<const Prologue*>(ctx);
  const int64_t m1 = std::min(p.M, (task + 1) * kPrologueRows);
  for (int64_t m = task * kPrologueRows; m < m1; ++m) {
    const float* row = static_cast<const float*>(p.x) + m * p.K;
    if (p.xf) {
      float* dst = p.xf + m * p.stride;
      for (int64_t k = 0; k < p.K; ++k)
        dst[k] = p.dtype == kFloat32 ? static_cast<const float*>(p.x)[m * p.K + k]
                                     : bf16_to_float(static_cast<const uint16_t*>(p.x)[m * p.K + k]);
      std::fill(dst + p.K, dst + p.stride, 0.0f);
      row = dst;
    }
    if (p.avx512) int8_activation_avx512(row, p.stride, p.Kp, p.xq + m * 3 * p.Kp, p.xinit + m * 48, p.xscale + m);
  }
}

struct Rows {
  const Int8Args* a;
  Isa isa;
};

void rows_task(void* ctx, int64_t task) {
  const Rows& r = *static_cast<const Rows*>(ctx);
  const int64_t n0 = task * kRowsPerTask, n1 = std::min(r.a->N, n0 + kRowsPerTask);
  if (r.isa >= kIsaAvx512) return gemm_int8_rows_avx512(*r.a, n0, n1);  // (AMX: not used for the head yet)
  if (r.isa == kIsaAvx2) return gemm_int8_rows_avx2(*r.a, n0, n1);
  gemm_int8_rows_scalar(*r.a, n0, n1);
}

}  // namespace
}  // namespace cpu

using namespace cpu;

int gemm_int8_cpu(const void* x, const int8_t* weight, const void* scale, const void* bias, void* out,
                  int64_t M, int64_t K, int64_t N, int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16) return kBadDType;
  if (M < 1 || K < 1 || N < 1 || K > kInt8MaxK) return kBadShape;
  const Isa isa = active_isa();
  const bool avx512 = isa >= kIsaAvx512;
  const int nt = kernel_threads(N * K);
  const int64_t Kp = (K + 63) / 64 * 64;

  Prologue p{x, M, K, avx512 ? (K + 7) / 8 * 8 : K, Kp, dtype, avx512, nullptr, nullptr, nullptr, nullptr};
  if (dtype != kFloat32 || p.stride != K) p.xf = scratch<float>(kSlotX, M * p.stride);
  if (avx512) {
    p.xq = scratch<int8_t>(kSlotXq, M * 3 * Kp);
    p.xinit = scratch<int32_t>(kSlotXinit, M * 48);
    p.xscale = scratch<float>(kSlotXscale, M);
  }
  parallel_tasks((M + kPrologueRows - 1) / kPrologueRows, nt, prologue_task, &p);

  // fp32 bodies read x [M, K]: the copy has stride K when they run.
  const Int8Args a{p.xf ? p.xf : static_cast<const float*>(x), p.xq, p.xinit, p.xscale, weight, scale, bias, out,
                   M, K, Kp, N, dtype};
  Rows r{&a, isa};
  parallel_tasks((N + kRowsPerTask - 1) / kRowsPerTask, nt, rows_task, &r);
  return kOk;
}

}  // namespace quant_cuda
