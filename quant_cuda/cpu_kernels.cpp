// CPU entry points of the kernel API (kernels.h): argument checks, the activation
// prologue, and the OpenMP split. The arithmetic lives in cpu_kernels_avx2.cpp (AVX2 +
// FMA, chosen at run time) and cpu_kernels_scalar.cpp (any x86-64 or other CPU).
//
// Work split: output columns are cut into tiles (32 columns, then 8-column tails) and the
// tiles into chunks of ~512 columns, handed to OpenMP threads dynamically (a thread that
// loses its core to another process does not hold the others up). A chunk walks K a few
// groups at a time across all of its tiles, keeping fp32 partial sums in acc [M, N]: that
// reads qweight as ~16 sequential row streams, which the hardware prefetchers follow.
// Walking all of K per tile instead jumps N*4 bytes (16-44 KB on 7B layers) from row to
// row and measured ~2-3x slower at M=1 on 4096x11008 (best of 30: 2.3 vs 5-8 ms, one
// thread). Every output element is produced by one thread in a fixed order, so results
// are bitwise identical run to run and for any thread count.
#include <algorithm>
#include <atomic>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_kernels.h"
#include "kernels.h"

namespace quant_cuda {
namespace cpu {

namespace {
std::atomic<int> g_threads{0};

int threads() {
  const int n = g_threads.load(std::memory_order_relaxed);
#ifdef _OPENMP
  return n > 0 ? n : omp_get_max_threads();
#else
  return n > 0 ? n : 1;
#endif
}

// K rows walked per pass over a thread's columns: enough rows (16 packed rows and up) to
// amortise the accumulator round trip, few enough streams for the prefetchers.
constexpr int64_t kRowsPerPass = 128;
// 16 tiles of 32 columns: 512 columns, 2 KB of each qweight row per pass.
constexpr int64_t kTilesPerChunk = 16;

// out[:, c0:c0+width] = acc (+ bias), converted to the output dtype.
void store_columns(const GemmArgs& a, const float* acc, int64_t c0, int64_t width) {
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t c = c0; c < c0 + width; ++c) {
      float y = acc[m * a.N + c];
      if (a.bias)
        y += a.dtype == kFloat32 ? static_cast<const float*>(a.bias)[c]
                                 : bf16_to_float(static_cast<const uint16_t*>(a.bias)[c]);
      if (a.dtype == kFloat32)
        static_cast<float*>(a.out)[m * a.N + c] = y;
      else
        static_cast<uint16_t*>(a.out)[m * a.N + c] = float_to_bf16(y);
    }
  }
}

bool shape_ok(int64_t K, int64_t N, int64_t group_size) {
  return K >= 8 && N >= 8 && K % 8 == 0 && N % 8 == 0 && group_size >= 8 && group_size % 8 == 0;
}
}  // namespace

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

const char* cpu_isa() { return cpu_has_avx2_fma() ? "avx2+fma" : "scalar"; }

void set_cpu_threads(int n) { g_threads.store(n, std::memory_order_relaxed); }

}  // namespace cpu

using namespace cpu;

int gemm_4bit_cpu(const void* x, const int32_t* qweight, const int32_t* qzeros,
                  const void* scales, const int32_t* perm, const void* bias, void* out,
                  int64_t M, int64_t K, int64_t N, int64_t group_size, int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16) return kBadDType;
  if (M < 1 || !shape_ok(K, N, group_size)) return kBadShape;
  const int64_t G = (K + group_size - 1) / group_size;

  // Prologue: gather x into qweight's row order (act-order), widen bf16 to fp32, apply the
  // per-nibble scale (cpu_kernels.h) and sum each group in double, so that the epilogue
  // scale * (sum q*x - zero * sum x) loses nothing to the group sum. O(M*K): small next
  // to the O(M*K*N) main loop.
  std::vector<float> xs(size_t(M * K)), xsum(size_t(M * G));
  const int nt = threads();
#pragma omp parallel for schedule(static) num_threads(nt) if (M > 8)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r1 = std::min(K, (g + 1) * group_size);
      double s = 0.0;
      for (int64_t r = g * group_size; r < r1; ++r) {
        const int64_t src = m * K + (perm ? perm[r] : r);
        const float v = dtype == kFloat32 ? static_cast<const float*>(x)[src]
                                          : bf16_to_float(static_cast<const uint16_t*>(x)[src]);
        xs[size_t(m * K + r)] = v * nibble_scale(int(r & 7));
        s += v;
      }
      xsum[size_t(m * G + g)] = float(s);
    }
  }

  const GemmArgs a{xs.data(), xsum.data(), qweight, qzeros, scales, bias, out,
                   M, K, N, G, group_size, dtype};
  const auto body = cpu_has_avx2_fma() ? gemm_columns_avx2 : gemm_columns_scalar;
  const int64_t wide = N / 32, tiles = wide + (N % 32) / 8;
  const int64_t groups_per_pass = std::max<int64_t>(1, kRowsPerPass / group_size);
  std::vector<float> acc(size_t(M * N), 0.0f);
  const int64_t chunks = (tiles + kTilesPerChunk - 1) / kTilesPerChunk;
  auto tile_col = [wide](int64_t t) { return t < wide ? 32 * t : 32 * wide + 8 * (t - wide); };
  auto tile_width = [wide](int64_t t) { return t < wide ? int64_t(32) : int64_t(8); };
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t t0 = chunk * kTilesPerChunk, t1 = std::min(tiles, t0 + kTilesPerChunk);
    for (int64_t g0 = 0; g0 < G; g0 += groups_per_pass) {
      const int64_t g1 = std::min(G, g0 + groups_per_pass);
      for (int64_t t = t0; t < t1; ++t) body(a, tile_col(t), tile_width(t), g0, g1, acc.data());
    }
    for (int64_t t = t0; t < t1; ++t) store_columns(a, acc.data(), tile_col(t), tile_width(t));
  }
  return kOk;
}

int dequantize_4bit_cpu(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                        void* out, int64_t K, int64_t N, int64_t group_size, int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16) return kBadDType;
  if (!shape_ok(K, N, group_size)) return kBadShape;
  const auto body = cpu_has_avx2_fma() ? dequant_packed_row_avx2 : dequant_packed_row_scalar;
  const int nt = threads();
  // Rows split across threads: each thread writes whole contiguous output rows.
#pragma omp parallel for schedule(static) num_threads(nt)
  for (int64_t kp = 0; kp < K / 8; ++kp) body(qweight, qzeros, scales, out, kp, N, group_size, dtype);
  return kOk;
}

}  // namespace quant_cuda
