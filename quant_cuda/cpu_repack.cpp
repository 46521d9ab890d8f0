// Row permutation of a packed 4-bit qweight (kernels.h permute_rows_4bit_cpu): the repack
// that puts an act-order checkpoint's rows into the kernel's order at load time, and back
// into the standard order when saving. Torch-free.
//
// Why in C++: in torch the gather moves one nibble per element through int64 index
// tensors and temporaries; a BlueLM-7B layer took ~19 s on 2 threads (10 min per load).
// Here each output word row is built from 8 source word rows read in sequence, with the
// inner loop over contiguous columns (the compiler vectorizes it): memory-bound.
#include <algorithm>
#include <cstdint>

#include "cpu_kernels.h"
#include "cpu_threads.h"
#include "kernels.h"

namespace quant_cuda {
namespace {

constexpr int64_t kRowsPerTask = 16;  // output word rows per task: 16 x N words

struct Repack {
  const uint32_t* in;
  uint32_t* out;
  const int64_t* order;
  int64_t rows, N;  // rows = K / 8 word rows
};

void repack_task(void* ctx, int64_t task) {
  const Repack& r = *static_cast<const Repack*>(ctx);
  const int64_t r0 = task * kRowsPerTask, r1 = std::min(r.rows, r0 + kRowsPerTask);
  for (int64_t row = r0; row < r1; ++row) {
    uint32_t* dst = r.out + row * r.N;
    for (int j = 0; j < 8; ++j) {
      const int64_t src = r.order[row * 8 + j];
      const uint32_t* s = r.in + (src / 8) * r.N;
      const unsigned down = unsigned(src % 8) * 4, up = unsigned(j) * 4;
      if (j == 0) {
        for (int64_t n = 0; n < r.N; ++n) dst[n] = ((s[n] >> down) & 0xFu);
      } else {
        for (int64_t n = 0; n < r.N; ++n) dst[n] |= ((s[n] >> down) & 0xFu) << up;
      }
    }
  }
}

}  // namespace

int permute_rows_4bit_cpu(const int32_t* qweight, int32_t* out, const int64_t* order, int64_t K, int64_t N) {
  if (K < 8 || K % 8 || N < 1) return kBadShape;
  for (int64_t i = 0; i < K; ++i)
    if (order[i] < 0 || order[i] >= K) return kBadShape;
  Repack r{reinterpret_cast<const uint32_t*>(qweight), reinterpret_cast<uint32_t*>(out), order, K / 8, N};
  const int64_t tasks = (r.rows + kRowsPerTask - 1) / kRowsPerTask;
  cpu::parallel_tasks(tasks, cpu::kernel_threads(K * N / 2), repack_task, &r);
  return kOk;
}

}  // namespace quant_cuda
