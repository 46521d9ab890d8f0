// Which CPU body the kernels run (cpu_kernels.h): the best one this CPU supports, or a
// lower one asked for (bluelm_quant.ops.set_cpu_isa, BLUELM_QUANT_CPU_ISA) to test it or
// compare speeds. A request above what the CPU has falls to the best it has, so a forced
// path can never execute an instruction the CPU lacks (SIGILL).
#include <atomic>
#include <cstring>
// parse_isa loops over a braced list; C++17 libstdc++ does not pull this in through <atomic>.
#include <initializer_list>

#include "cpu_kernels.h"

namespace quant_cuda {
namespace cpu {

namespace {
Isa detect() {
#if defined(__x86_64__) || defined(__i386__)
  // __builtin_cpu_supports also checks that the OS saves the vector registers (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
    return amx_usable() ? kIsaAmx : kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kIsaAvx2;
#endif
  return kIsaScalar;
}

std::atomic<int> g_active{-1};  // -1: not chosen yet (the detected one)
}  // namespace

Isa detected_isa() {
  static const Isa isa = detect();
  return isa;
}

Isa active_isa() {
  const int a = g_active.load(std::memory_order_relaxed);
  return a < 0 ? detected_isa() : Isa(a);
}

Isa select_isa(Isa requested) {
  const Isa isa = requested < detected_isa() ? requested : detected_isa();
  g_active.store(int(isa), std::memory_order_relaxed);
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case kIsaAmx: return "amx";
    case kIsaAvx512: return "avx512";
    case kIsaAvx2: return "avx2";
    default: return "scalar";
  }
}

bool parse_isa(const char* name, Isa* isa) {
  for (Isa i : {kIsaScalar, kIsaAvx2, kIsaAvx512, kIsaAmx}) {
    if (std::strcmp(name, isa_name(i)) == 0) {
      *isa = i;
      return true;
    }
  }
  if (std::strcmp(name, "best") == 0) {
    *isa = detected_isa();
    return true;
  }
  return false;
}

}  // namespace cpu
}  // namespace quant_cuda
