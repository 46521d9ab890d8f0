// Shared helpers of the 4-bit CUDA kernels: dtype conversion, nibble unpacking, loads.
//
// Everything here is __host__ __device__ so that tools/check_q4_kernels.cu can run the
// exact same per-thread code on the CPU (there is no GPU on the build machines). On the
// device the loads use cache hints; on the host they are plain memcpy reads.
#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <cstring>

#define Q4_HD __host__ __device__ __forceinline__

namespace quant_cuda {
namespace q4 {

// ---- bit casts -----------------------------------------------------------------------

Q4_HD float as_float(uint32_t u) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

Q4_HD uint32_t as_uint(float f) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

// PRMT: result byte i = byte (sel >> 4i) & 7 of the 8-byte value {b:a} (a = bytes 0..3).
Q4_HD uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#ifdef __CUDA_ARCH__
  return __byte_perm(a, b, sel);
#else
  const uint64_t v = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((v >> (8 * ((sel >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

// ---- activation / scale dtypes, handled as raw 16-bit words ------------------------------
// The kernels keep 16-bit values packed (two per uint32, the lower address in the low half,
// as in memory) and widen them to fp32 for all arithmetic.

struct Fp16 {
  static Q4_HD float to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static Q4_HD void pair(uint32_t w, float& lo, float& hi) {
    lo = to_float(uint16_t(w & 0xffffu));
    hi = to_float(uint16_t(w >> 16));
  }
  static Q4_HD uint16_t from_float(float f) { return __half_as_ushort(__float2half_rn(f)); }
};

// bf16 is the top half of an fp32, so widening is a shift or a mask (no cvt, and no
// sm_80-only intrinsics: this compiles unchanged for sm_75).
struct Bf16 {
  static Q4_HD float to_float(uint16_t b) { return as_float(uint32_t(b) << 16); }
  static Q4_HD void pair(uint32_t w, float& lo, float& hi) {
    lo = as_float(w << 16);
    hi = as_float(w & 0xffff0000u);
  }
  // Round to nearest even, NaN kept quiet: the same result as __float2bfloat16_rn.
  static Q4_HD uint16_t from_float(float f) {
    const uint32_t u = as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
    return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
  }
};

// ---- 4-bit codes -> fp32 without cvt instructions ---------------------------------------
// A qweight word holds 8 codes of one column (row j in nibble j). We build the float
// 2 + code/8 directly: exponent of 2.0f (0x40000000) with the code in mantissa bits 19..22.
// Two masks put code<<3 into every byte (even rows from q<<3, odd rows from q>>1), then one
// PRMT per code moves that byte into bits 16..23 and fills the rest from 0x40000000.
// Cost: 11 integer ops per 8 codes, versus 8 I2F (quarter-rate on the SM) plus 8 shifts/ands.
// The offset 2 and the factor 1/8 are folded into the group constants (see GroupConst).
Q4_HD void unpack8(uint32_t q, float f[8]) {
  const uint32_t even = (q << 3) & 0x78787878u;  // byte k = code(2k)   << 3
  const uint32_t odd = (q >> 1) & 0x78787878u;   // byte k = code(2k+1) << 3
  const uint32_t magic = 0x40000000u;            // 2.0f
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const uint32_t sel = 0x7054u | (uint32_t(k) << 8);  // bytes: [b0=0, b1=0, a.k, b3=0x40]
    f[2 * k] = as_float(byte_perm(even, magic, sel));
    f[2 * k + 1] = as_float(byte_perm(odd, magic, sel));
  }
}

// Per group and column: weight = scale * (code - zero) = a * f + b with f = 2 + code/8,
// a = 8 * scale, b = -(16 + zero) * scale (both exact in fp32: scale has <= 11 significant
// bits, 16 + zero <= 32). zero = stored v1 nibble + 1.
struct GroupConst {
  float a[4], b[4];
};

// ---- loads ------------------------------------------------------------------------------
// qweight is read exactly once per launch: stream it (evict-first in L2, L1 bypass on most
// parts) so it does not push x, scales and zeros out of cache.
Q4_HD uint4 load_stream16(const int32_t* p) {
#ifdef __CUDA_ARCH__
  const int4 v = __ldcs(reinterpret_cast<const int4*>(p));
  return make_uint4(uint32_t(v.x), uint32_t(v.y), uint32_t(v.z), uint32_t(v.w));
#else
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
#endif
}

// x, scales, zeros, perm, bias: re-read by every column tile, so they go through the
// read-only (L1-cached) path. T is uint4, uint2, uint32_t or uint16_t (the __ldg overloads).
template <class T>
Q4_HD T load_ro(const void* p) {
#ifdef __CUDA_ARCH__
  return __ldg(static_cast<const T*>(p));
#else
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
#endif
}

// Part `part` of `total` items split into `parts` contiguous ranges: [begin, end), empty
// when part * chunk >= total. int, not int64_t: 64-bit indices cost two registers each, and
// registers decide how many blocks share an SM (the launchers check the sizes fit).
Q4_HD void split_range(int total, int parts, int part, int& begin, int& end) {
  const int chunk = (total + parts - 1) / parts;
  begin = part * chunk < total ? part * chunk : total;
  end = begin + chunk < total ? begin + chunk : total;
}

// The group constants of 4 consecutive columns col0..col0+3 (col0 % 4 == 0, so the four
// zeros share one qzeros word and the four scales are one aligned 8-byte load).
template <class D>
Q4_HD void load_group(const int32_t* qzeros, const uint16_t* scales, int64_t N, int64_t g,
                      int64_t col0, GroupConst& gc) {
  const uint2 sv = load_ro<uint2>(scales + g * N + col0);
  const uint32_t zw = load_ro<uint32_t>(qzeros + g * (N / 8) + col0 / 8) >> (4 * (col0 & 7));
  float s[4];
  D::pair(sv.x, s[0], s[1]);
  D::pair(sv.y, s[2], s[3]);
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    const float zero = float(((zw >> (4 * c)) & 15u) + 1u);
    gc.a[c] = 8.0f * s[c];
    gc.b[c] = -(16.0f + zero) * s[c];
  }
}

}  // namespace q4
}  // namespace quant_cuda
