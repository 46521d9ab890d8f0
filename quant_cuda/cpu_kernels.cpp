// CPU entry points of the kernel API (kernels.h): argument checks, the activation
// prologue, and the split into tasks for the thread pool (cpu_threads.h). The arithmetic
// lives in the bodies picked at run time (cpu_isa.cpp): cpu_kernels_amx.cpp (AMX tiles,
// M >= 2), cpu_kernels_avx512.cpp (AVX-512 VNNI), cpu_kernels_avx2.cpp (AVX2 + FMA) and
// cpu_kernels_scalar.cpp (any CPU).
//
// Work split: output columns are cut into chunks (chunk_width; block_chunk_width for a
// layer in column blocks), one task each, claimed by whichever thread is free (a thread
// that loses its core to another process does not hold the others up). A chunk walks K a
// group or a few at a time across all of its columns, keeping fp32 partial sums in acc
// [M, N]: that reads qweight as ~16 row streams (in column blocks: one), which the hardware
// prefetchers follow. Walking all of K per column tile instead jumps N*4 bytes (16-44 KB on
// 7B layers) from row to row and measured ~2-3x slower at M=1 on 4096x11008 (best of 30: 2.3
// vs 5-8 ms, one thread). Every output element is produced by one task, summing its groups
// in the same order whatever the chunk, so results are bitwise identical run to run, for any
// thread count and in either layout.
//
// Scratch (activations in kernel form, acc) lives in buffers of the calling thread that
// grow and are reused (thread_scratch): no allocation per call once a shape has been seen.
#include <algorithm>
#include <atomic>
#include <vector>

#include "cpu_kernels.h"
#include "cpu_threads.h"
#include "kernels.h"

namespace quant_cuda {
namespace cpu {

namespace {
std::atomic<int> g_threads{0};

int threads() {
  static const int cpus = usable_cpus();  // a syscall: once (bluelm_quant.cpu_settings also reads it once)
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? std::min(n, cpus) : cpus;
}

// Below this many bytes of qweight a layer runs on the calling thread alone: handing out
// work costs about a microsecond, and waking a sleeping helper tens of them.
constexpr int64_t kParallelMinBytes = 32 << 10;

// AVX2/scalar: K rows walked per pass over a chunk's columns: enough rows (16 packed rows
// and up) to amortise the accumulator round trip, few enough streams for the prefetchers.
constexpr int64_t kRowsPerPass = 128;

// Columns per task: 512 (2 KB of each qweight row, long sequential reads) on wide layers,
// narrower ones so that a layer has >= 8 tasks to balance over threads (576-wide
// SmolLM2 layers: 128 columns, 5 tasks). A multiple of 64, the AVX-512 tile (the bodies
// mask a narrower chunk's last tile, as block_chunk_width's may be).
int64_t chunk_width(int64_t N) {
  const int64_t w = ((N + 7) / 8 + 63) / 64 * 64;
  return std::min<int64_t>(512, std::max<int64_t>(64, w));
}

// Columns per task on a layer in column blocks (kernels.h): the block in the fewest equal parts
// (multiples of 8) that give every thread a task. At M = 1 that is a whole block wherever there
// are enough blocks: its rows are then one sequential stream. With more rows the task also updates
// an [M, width] slice of acc per group, which whole blocks made too large: parts of at most 768
// columns. Measured (2 threads, 4096x22016 in blocks of 2752, ms; the standard layout with
// its 512-column chunks / whole blocks / parts <= 512 / parts <= 768): M=128 46.5 / 64.4 / 54.7 /
// 49.4, M=32 13.9 / 14.8 / 17.0 / 14.1; the 1024-wide blocks of 4096x12288 and 11008x4096 within
// 3% either way.
int64_t block_chunk_width(int64_t block, int64_t N, int64_t M, int threads) {
  const int64_t widest = M == 1 ? block : 768;
  for (int64_t parts = 1;; ++parts) {
    const int64_t width = block / parts;
    if (width <= 8) return 8;
    if (block % parts == 0 && width % 8 == 0 && width <= widest && N / block * parts >= threads) return width;
  }
}

// out[:, c0:c1] = acc (+ bias), converted to the output dtype.
void store_columns(const GemmArgs& a, const float* acc, int64_t c0, int64_t c1) {
  for (int64_t m = 0; m < a.M; ++m) {
    for (int64_t c = c0; c < c1; ++c) {
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

float load_x(const void* x, int dtype, int64_t i) {
  return dtype == kFloat32 ? static_cast<const float*>(x)[i] : bf16_to_float(static_cast<const uint16_t*>(x)[i]);
}

bool shape_ok(int64_t K, int64_t N, int64_t group_size) {
  return K >= 8 && N >= 8 && K % 8 == 0 && N % 8 == 0 && group_size >= 8 && group_size % 8 == 0;
}

// ---- activation prologue: O(M*K), small next to the O(M*K*N) main loop --------------

struct Prologue {
  const void* x;
  const int32_t* perm;
  int64_t M, K, G, group_size;
  int dtype;
  Isa isa;
  const AmxPlan* amx;  // AMX tile layout for the digits; null: the AVX-512 one
  float* xf;  // AVX-512: [M, K] fp32 in qweight's row order (null: x itself is that);
              // AVX2/scalar: [M, K] pre-scaled activations
  int8_t* xq;
  float *xscale, *xsum;
};

constexpr int64_t kPrologueRows = 4;  // rows per prologue task (~2 us each at K = 4096)

void prologue_task(void* ctx, int64_t task) {
  const Prologue& p = *static_cast<const Prologue*>(ctx);
  const int64_t m1 = std::min(p.M, (task + 1) * kPrologueRows);
  for (int64_t m = task * kPrologueRows; m < m1; ++m) {
    if (p.isa >= kIsaAvx512) {
      const float* row = static_cast<const float*>(p.x) + m * p.K;
      if (p.xf) {  // gather into qweight's row order (act-order) and widen bf16
        float* dst = p.xf + m * p.K;
        for (int64_t r = 0; r < p.K; ++r) dst[r] = load_x(p.x, p.dtype, m * p.K + (p.perm ? p.perm[r] : r));
        row = dst;
      }
      const DigitLayout out = p.amx ? amx_layout(p.xq, m, *p.amx) : avx512_layout(p.xq, m, p.K);
      activation_digits_avx512(row, p.K, p.group_size, out, p.xscale + m * p.G, p.xsum + m * p.G);
      continue;
    }
    // AVX2/scalar: gather, widen, apply the per-nibble scale (cpu_kernels.h) and sum
    // each group in double, so that the epilogue scale * (sum q*x - zero * sum x)
    // loses nothing to the group sum.
    for (int64_t g = 0; g < p.G; ++g) {
      const int64_t r1 = std::min(p.K, (g + 1) * p.group_size);
      double s = 0.0;
      for (int64_t r = g * p.group_size; r < r1; ++r) {
        const float v = load_x(p.x, p.dtype, m * p.K + (p.perm ? p.perm[r] : r));
        p.xf[m * p.K + r] = v * nibble_scale(int(r & 7));
        s += v;
      }
      p.xsum[m * p.G + g] = float(s);
    }
  }
}

// ---- main loop -------------------------------------------------------------------------

struct Chunks {
  const GemmArgs* a;
  float* acc;
  int64_t width;
  Isa isa;
  const AmxPlan* amx;  // non-null: AMX tiles
};

void gemm_chunk_task(void* ctx, int64_t task) {
  const Chunks& t = *static_cast<const Chunks*>(ctx);
  const GemmArgs& a = *t.a;
  const int64_t c0 = task * t.width, c1 = std::min(a.N, c0 + t.width);
  for (int64_t m = 0; m < a.M; ++m) std::fill(t.acc + m * a.N + c0, t.acc + m * a.N + c1, 0.0f);
  if (t.amx) return gemm_chunk_amx(a, *t.amx, c0, c1, t.acc, scratch<uint8_t>(kSlotTiles, 128 * a.group_size));
  if (t.isa >= kIsaAvx512) return gemm_chunk_avx512(a, c0, c1, t.acc);

  const auto body = t.isa == kIsaAvx2 ? gemm_columns_avx2 : gemm_columns_scalar;
  const int64_t groups_per_pass = std::max<int64_t>(1, kRowsPerPass / a.group_size);
  for (int64_t g0 = 0; g0 < a.G; g0 += groups_per_pass) {
    const int64_t g1 = std::min(a.G, g0 + groups_per_pass);
    for (int64_t c = c0; c < c1;) {  // 32-column tiles, then 8-column tails
      const int64_t w = c1 - c >= 32 ? 32 : 8;
      body(a, c, w, g0, g1, t.acc);
      c += w;
    }
  }
  store_columns(a, t.acc, c0, c1);
}

}  // namespace

void set_cpu_threads(int n) { g_threads.store(n, std::memory_order_relaxed); }

int kernel_threads(int64_t weight_bytes) { return weight_bytes < kParallelMinBytes ? 1 : threads(); }

void* thread_scratch(int slot, int64_t bytes) {
  thread_local std::vector<char> buffers[kScratchSlots];
  std::vector<char>& b = buffers[slot];
  if (int64_t(b.size()) < bytes + 64) b.resize(size_t(bytes + 64));
  const uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
  return reinterpret_cast<void*>((p + 63) & ~uintptr_t(63));
}

}  // namespace cpu

using namespace cpu;

int gemm_4bit_cpu(const void* x, const int32_t* qweight, const int32_t* qzeros,
                  const void* scales, const int32_t* perm, const void* bias, void* out,
                  int64_t M, int64_t K, int64_t N, int64_t group_size, int dtype, int64_t block) {
  if (dtype != kFloat32 && dtype != kBFloat16) return kBadDType;
  if (M < 1 || !shape_ok(K, N, group_size)) return kBadShape;
  if (block < 0 || (block && (block % 8 || N % block))) return kBadShape;
  const int64_t G = (K + group_size - 1) / group_size;
  const Isa isa = active_isa();
  const int nt = kernel_threads(K * N / 2);

  // AMX from 2 rows on (a single row cannot fill a tile: the AVX-512 body is faster there).
  const bool use_amx = isa == kIsaAmx && M >= 2;
  const AmxPlan plan = use_amx ? amx_plan(M, K, group_size) : AmxPlan{};
  Prologue p{x, perm, M, K, G, group_size, dtype, isa, use_amx ? &plan : nullptr,
             nullptr, nullptr, nullptr, scratch<float>(kSlotXsum, M * G)};
  if (isa >= kIsaAvx512) {
    const int64_t rows = use_amx ? plan.padded_rows : M;
    p.xq = scratch<int8_t>(kSlotXq, rows * K * 3);
    if (rows > M)  // the last AMX pass reads whole tiles: its missing rows must be zero digits
      for (int64_t b = 0; b < K / plan.kb; ++b)
        std::fill_n(p.xq + (b * rows + M) * 3 * plan.kb, (rows - M) * 3 * plan.kb, int8_t(0));
    p.xscale = scratch<float>(kSlotXscale, M * G);
    if (perm || dtype != kFloat32) p.xf = scratch<float>(kSlotX, M * K);
  } else {
    p.xf = scratch<float>(kSlotX, M * K);
  }
  parallel_tasks((M + kPrologueRows - 1) / kPrologueRows, nt, prologue_task, &p);
  const GemmArgs a{isa >= kIsaAvx512 ? nullptr : p.xf, p.xq, p.xscale, p.xsum, qweight, qzeros, scales, bias, out,
                   M, K, N, G, group_size, dtype, block};

  const int64_t width = block ? block_chunk_width(block, N, M, nt) : chunk_width(N);
  Chunks c{&a, scratch<float>(kSlotAcc, M * N), width, isa, use_amx ? &plan : nullptr};
  parallel_tasks((N + width - 1) / width, nt, gemm_chunk_task, &c);
  return kOk;
}

namespace {
struct Dequant {
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;
  void* out;
  int64_t K, N, group_size, rows_per_task;
  int dtype;
  Isa isa;
};

void dequant_task(void* ctx, int64_t task) {
  const Dequant& d = *static_cast<const Dequant*>(ctx);
  const auto body = d.isa >= kIsaAvx2 ? dequant_packed_row_avx2 : dequant_packed_row_scalar;
  const int64_t kp1 = std::min(d.K / 8, (task + 1) * d.rows_per_task);
  for (int64_t kp = task * d.rows_per_task; kp < kp1; ++kp)
    body(d.qweight, d.qzeros, d.scales, d.out, kp, d.N, d.group_size, d.dtype);
}
}  // namespace

namespace {
struct Probe {
  const uint64_t* p;
  int64_t words;
  std::atomic<uint64_t> acc{0};
};

constexpr int64_t kProbeWords = 32768;  // 256 KB per task, as a chunk of a wide 7B layer
constexpr int64_t kProbeAhead = 512;    // words: 4 KB

void probe_task(void* ctx, int64_t task) {
  Probe& pr = *static_cast<Probe*>(ctx);
  const int64_t w0 = task * kProbeWords, w1 = std::min(pr.words, w0 + kProbeWords);
  uint64_t x[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 independent lanes: the compiler vectorizes this
  int64_t w = w0;
  for (; w + 8 <= w1; w += 8) {
    __builtin_prefetch(pr.p + w + kProbeAhead);  // as the kernels do: more reads in flight
    for (int i = 0; i < 8; ++i) x[i] ^= pr.p[w + i];
  }
  for (; w < w1; ++w) x[0] ^= pr.p[w];
  pr.acc.fetch_xor(x[0] ^ x[1] ^ x[2] ^ x[3] ^ x[4] ^ x[5] ^ x[6] ^ x[7], std::memory_order_relaxed);
}
}  // namespace

uint64_t read_probe_cpu(const void* p, int64_t bytes) {
  Probe pr;
  pr.p = static_cast<const uint64_t*>(p);
  pr.words = bytes / 8;
  parallel_tasks((pr.words + kProbeWords - 1) / kProbeWords, kernel_threads(bytes), probe_task, &pr);
  return pr.acc.load();
}

int dequantize_4bit_cpu(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                        void* out, int64_t K, int64_t N, int64_t group_size, int dtype) {
  if (dtype != kFloat32 && dtype != kBFloat16) return kBadDType;
  if (!shape_ok(K, N, group_size)) return kBadShape;
  // Each task writes whole contiguous output rows; ~64 tasks balance over threads.
  const int64_t packed_rows = K / 8, per_task = std::max<int64_t>(1, packed_rows / 64);
  Dequant d{qweight, qzeros, scales, out, K, N, group_size, per_task, dtype, active_isa()};
  parallel_tasks((packed_rows + per_task - 1) / per_task, kernel_threads(K * N / 2), dequant_task, &d);
  return kOk;
}

}  // namespace quant_cuda
