// Tensor-core GEMV for small batches (sm_80+): out[M, N] = x[M, K] @ W^T, M <= 16 per block
// row, fp32 accumulation in mma.sync.m16n8k16. On CUDA cores the dequantize + FMA costs
// ~5 instructions per weight, which caps a 4-bit GEMV well below HBM bandwidth on H100;
// here the dequantization is 2 half2 ops per 2 weights and the products are free.
//
// Layout and split (a block = one 32-column tile, the whole of K, 16 warps):
//   step = 32 input rows = 4 slabs (a slab is one qweight row: 8 input rows). Warp w owns a
//   contiguous chunk of steps. In a step, lane (g = lane / 4, t = lane % 4) loads
//     qweight[slab 4*step + t][col0 + 4g .. 4g+3]   (16 B; 8 lanes cover one 128-byte line)
//     x[row g (and g + 8)][8 rows of that slab]      (16 B each)
//   and feeds 2 k16 x 4 n8 MMAs. The MMA's k order is free as long as A and B agree: lane t
//   maps MMA k-pair registers to nibbles (j, j+4) of its own slab, for both x and weights,
//   which is exactly what the half2 magic conversion produces: (q >> 4j) & 0x000f000f puts
//   codes j and j+4 into the two halves.
//   n8-tile i of the warp holds physical columns 4n + i (n = 0..7), because lane g's 16-byte
//   load gives it columns 4g + i for the four tiles i.
// Weights are dequantized to the activation dtype exactly like the reference
// (w = dtype((code - zero) * scale): an exact subtraction, one rounded multiply), so the
// only difference to dequantize-then-matmul is the fp32 summation order.
// Partial tiles are reduced over the 16 warps in shared memory in a fixed order:
// deterministic, no atomics, no workspace.
#pragma once
#include <type_traits>

#include "q4_common.cuh"
#include "q4_gemv.cuh"  // GemvArgs, load_x8

namespace quant_cuda {
namespace q4 {

template <int MT, bool kGather>
struct MmaConfig {
  static constexpr int kWarps = 16;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kTileN = 32;
  // Steps whose loads are issued before any is used: 8 x 16 B per lane at MT = 8 keeps
  // 64 KB in flight per SM (needed ~25 KB at H100 bandwidth), and at K = 4096 each warp
  // owns exactly 8 steps. MT = 16 holds a second x row and the gather path 8 indices per
  // slab, so those keep 4 steps in flight to stay within 128 registers.
  static constexpr int kUnroll = MT == 8 && !kGather ? 8 : 4;
};

// Integer bits of the "magic" value 1024 (fp16) / 128 (bf16): their ulp is 1, so OR-ing a
// nibble into the low mantissa bits gives 1024 + code exactly.
template <class D>
struct Magic;
template <>
struct Magic<Fp16> {
  static constexpr uint32_t kBits = 0x6400u;
};
template <>
struct Magic<Bf16> {
  static constexpr uint32_t kBits = 0x4300u;
};

// Per lane and group: 4 columns' (magic + zero) and scale, each duplicated into a pair.
struct MmaGroup {
  uint32_t zero2[4], scale2[4];
};

template <class D>
Q4_HD void load_mma_group(const GemvArgs& a, int grp, int64_t col0, MmaGroup& mg) {
  const uint2 sv = load_ro<uint2>(a.scales + int64_t(grp) * a.N + col0);
  const uint32_t zw = load_ro<uint32_t>(a.qzeros + int64_t(grp) * (a.N / 8) + col0 / 8) >> (4 * (col0 & 7));
  const uint32_t s[4] = {sv.x & 0xffffu, sv.x >> 16, sv.y & 0xffffu, sv.y >> 16};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t z = Magic<D>::kBits + ((zw >> (4 * i)) & 15u) + 1u;  // magic + v1 zero + 1
    mg.zero2[i] = z | (z << 16);
    mg.scale2[i] = s[i] | (s[i] << 16);
  }
}

// (h - zero) * scale on a pair: exact subtraction of two small integers, one rounding.
template <class D>
Q4_HD uint32_t dequant_pair(uint32_t h, uint32_t zero2, uint32_t scale2) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<D, Fp16>::value) {
    __half2 r = __hmul2(__hsub2(*reinterpret_cast<__half2*>(&h), *reinterpret_cast<__half2*>(&zero2)),
                        *reinterpret_cast<__half2*>(&scale2));
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    __nv_bfloat162 r = __hmul2(__hsub2(*reinterpret_cast<__nv_bfloat162*>(&h), *reinterpret_cast<__nv_bfloat162*>(&zero2)),
                               *reinterpret_cast<__nv_bfloat162*>(&scale2));
    return *reinterpret_cast<uint32_t*>(&r);
  }
#else  // host emulation (and never-launched pre-sm_80 device code): same single rounding
  float h0, h1, z0, z1, s0, s1;
  D::pair(h, h0, h1);
  D::pair(zero2, z0, z1);
  D::pair(scale2, s0, s1);
  return uint32_t(D::from_float((h0 - z0) * s0)) | (uint32_t(D::from_float((h1 - z1) * s1)) << 16);
#endif
}

// (v & mask) | bits in one LOP3: the compiler splits it in two when both are immediates.
Q4_HD uint32_t and_or(uint32_t v, uint32_t mask, uint32_t bits) {
#ifdef __CUDA_ARCH__
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;\n" : "=r"(r) : "r"(v), "n"(0x000f000f), "r"(bits));
  (void)mask;
  return r;
#else
  return (v & mask) | bits;
#endif
}

// B fragments of one lane for one step: b[i][k][r] = register r of MMA k (0: nibbles 0/4
// and 1/5; 1: nibbles 2/6 and 3/7) of n8-tile i, from qweight word i (column col0 + i).
template <class D>
Q4_HD void b_fragments(const uint4& qv, const MmaGroup& mg, uint32_t (&b)[4][2][2]) {
  const uint32_t q[4] = {qv.x, qv.y, qv.z, qv.w};
  const uint32_t magic2 = Magic<D>::kBits | (Magic<D>::kBits << 16);
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t h = and_or(q[i] >> (4 * j), 0x000f000fu, magic2);  // magic + codes j, j+4
      b[i][j / 2][j % 2] = dequant_pair<D>(h, mg.zero2[i], mg.scale2[i]);
    }
}

// A fragments of one x row for one step, in the same k order: a[k][r] = pair of rows
// (2k + r, 2k + r + 4) of the slab, as (low, high) halves.
Q4_HD void a_fragments(const uint4& xv, uint32_t (&a)[2][2]) {
  a[0][0] = byte_perm(xv.x, xv.z, 0x5410u);  // x0, x4
  a[0][1] = byte_perm(xv.x, xv.z, 0x7632u);  // x1, x5
  a[1][0] = byte_perm(xv.y, xv.w, 0x5410u);  // x2, x6
  a[1][1] = byte_perm(xv.y, xv.w, 0x7632u);  // x3, x7
}

template <class D>
__device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (std::is_same<D, Fp16>::value)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// grid = (ceil(N / 32), ceil(M / MT)); block = 512. Requires K % 32 == 0, group_size % 8 == 0.
template <class D, int MT, bool kGather>
__global__ void __launch_bounds__(MmaConfig<MT, kGather>::kThreads) mma_4bit_kernel(const GemvArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using C = MmaConfig<MT, kGather>;
  constexpr int U = C::kUnroll;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t col0 = int64_t(blockIdx.x) * C::kTileN + 4 * g;  // this lane's B columns
  const int64_t m0 = int64_t(blockIdx.y) * MT;
  const bool col_live = col0 < a.N;  // N % 8 == 0: 4 columns entirely in or out
  const bool row0_live = m0 + g < a.M, row1_live = MT == 16 && m0 + g + 8 < a.M;
  const uint16_t* x0 = a.x + (m0 + g) * a.K;
  const uint16_t* x1 = a.x + (m0 + g + 8) * a.K;

  float d[4][4];  // per n8-tile: rows (g, g+8) x logical columns (2t, 2t+1)
#pragma unroll
  for (int i = 0; i < 4; ++i) d[i][0] = d[i][1] = d[i][2] = d[i][3] = 0.0f;

  int sb, se;
  split_range(int(a.K / 32), C::kWarps, warp, sb, se);
  const int spg = int(a.group_size / 8);
  int g_next = 0;  // first slab past the loaded group; 0 forces a load at the first slab
  MmaGroup mg;
#pragma unroll
  for (int i = 0; i < 4; ++i) mg.zero2[i] = Magic<D>::kBits * 0x10001u, mg.scale2[i] = 0;  // w = 0 off N

  const int32_t* wp = a.qweight + (int64_t(sb) * 4 + t) * a.N + col0;
  for (int s = sb; s < se; s += U, wp += int64_t(4 * U) * a.N) {
    uint4 qv[U], xv0[U], xv1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool live = s + u < se;
      const int slab = 4 * (s + u) + t;
      qv[u] = live && col_live ? load_stream16(wp + int64_t(4 * u) * a.N) : make_uint4(0, 0, 0, 0);
      xv0[u] = live && row0_live ? load_x8<kGather>(a, x0, slab) : make_uint4(0, 0, 0, 0);
      xv1[u] = live && row1_live ? load_x8<kGather>(a, x1, slab) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (s + u < se) {
        const int slab = 4 * (s + u) + t;
        if (col_live && slab >= g_next) {  // slabs of a lane increase: reload at group starts
          const int grp = slab / spg;
          g_next = (grp + 1) * spg;
          load_mma_group<D>(a, grp, col0, mg);
        }
        uint32_t b[4][2][2], a0[2][2], a1[2][2] = {{0, 0}, {0, 0}};
        b_fragments<D>(qv[u], mg, b);
        a_fragments(xv0[u], a0);
        if (MT == 16) a_fragments(xv1[u], a1);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int k = 0; k < 2; ++k) mma_16816<D>(d[i], a0[k][0], a1[k][0], a0[k][1], a1[k][1], b[i][k][0], b[i][k][1]);
      }
    }
  }

  // Shared-memory reduction over warps, fixed order. d[i][r]: row g + 8 (r / 2), logical
  // column 2t + (r % 2) of tile i = physical column 4 (2t + r % 2) + i.
  __shared__ float red[C::kWarps][MT][C::kTileN];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r / 2);
      if (row < MT) red[warp][row][4 * (2 * t + r % 2) + i] = d[i][r];
    }
  __syncthreads();
  if (int(threadIdx.x) < MT * C::kTileN) {
    const int row = threadIdx.x / C::kTileN, col = threadIdx.x % C::kTileN;
    const int64_t n = int64_t(blockIdx.x) * C::kTileN + col;
    if (n < a.N && m0 + row < a.M)
      a.out[(m0 + row) * a.N + n] = finish_output<D>(&red[0][row][col], MT * C::kTileN, C::kWarps, a.bias, n);
  }
#else
  __trap();  // launched only on sm_80+ (the launcher checks the device)
#endif
}

}  // namespace q4
}  // namespace quant_cuda
