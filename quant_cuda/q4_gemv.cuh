// Fused dequantize-and-multiply on CUDA cores: out[M, N] = x[M, K] @ W^T. The path for
// sm_75, for K % 32 != 0 and for group sizes that are not a multiple of 8; sm_80+ runs the
// tensor-core kernel (q4_mma.cuh), which shares GemvArgs, load_x8 and finish_output.
//
// Memory layout (K = in_features, N = out_features):
//   qweight [K/8, N] int32. A "slab" is one row of qweight: 8 input rows of all N columns.
//   One 16-byte load at (slab, col0) gives 4 int32 = 8 rows x 4 columns of codes.
//
// Work split (one block per 32-column tile, the whole of K inside the block):
//
//          columns ->  tile 0 (block 0)   tile 1 (block 1)  ...  ceil(N/32) blocks
//   slabs  lane 0      [ct0 ct1 .. ct7]   [ct0 .. ct7]           ct = column thread,
//     |    lane 1      [ct0 ct1 .. ct7]                              4 columns each
//     v    ...                                                  lane = K-lane: a contiguous
//          lane 63     [ct0 ct1 .. ct7]                              chunk of ceil(S/64) slabs
//
//   A warp is 4 K-lanes x 8 column threads, so each load instruction reads four full
//   128-byte lines of qweight (one per slab row): every fetched sector is used.
//   Partial sums are reduced in a fixed order (shuffles inside the warp, then warps 0..15
//   in shared memory), so results are bitwise deterministic and need no atomics and no
//   global workspace.
//
// Why these sizes: a 7B layer has N = 4096 (128 tiles) to 12288 (384 tiles). 512 threads
// per block puts one tile on each of ~128 SMs at N = 4096 with 64 lanes x 8 slabs x 16 B
// = 8 KB per lane group in flight; larger N gives 2-3 resident blocks per SM. Narrower
// tiles would break the 128-byte lines; wider ones leave SMs idle at N = 4096.
//
// Per-thread arithmetic (group_size % 8 == 0, so a slab lies in one group): with
// f = 2 + code/8 (see unpack8) and the group constants a, b,
//   sum_j x_j * w_j = a * sum_j x_j f_j + b * sum_j x_j,
// so each weight costs one FFMA per activation row plus ~1.4 integer ops to unpack, and the
// scale is applied once per slab. Other group sizes take the per-row path (kAligned false).
#pragma once
#include "q4_common.cuh"

namespace quant_cuda {
namespace q4 {

struct GemvArgs {
  const uint16_t* x;       // [M, K] fp16/bf16 bits
  const int32_t* qweight;  // [K/8, N]
  const int32_t* qzeros;   // [G, N/8]
  const uint16_t* scales;  // [G, N]
  const int32_t* perm;     // [K] or nullptr
  const uint16_t* bias;    // [N] or nullptr
  uint16_t* out;           // [M, N]
  int64_t M, K, N, group_size;  // M: rows handled by this launch
};

template <int kThreads>
struct GemvShape {
  static constexpr int kColThreads = 8;            // 8 x 16 B = one 128-byte line per slab
  static constexpr int kTileN = 4 * kColThreads;   // columns per block
  static constexpr int kKLanes = kThreads / kColThreads;
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreads % 32 == 0, "whole warps");
};

// Threads per block and unroll for each compiled row tile MT.
// - kUnroll slabs of qweight and x are loaded into registers before any is used, so each
//   thread has kUnroll 16-byte weight loads in flight. Whole-chip need (Little's law):
//   ~3.35 TB/s x ~1 us = 3.3 MB, i.e. ~25 KB per SM; one 512-thread block at MT = 1 keeps
//   512 x 8 x 16 B = 64 KB in flight, and at K = 4096 a lane owns exactly 8 slabs, so
//   the whole weight read is issued up front.
// - MT <= 4: 512 threads, <= 128 registers (one block per SM, 16 warps).
// - MT = 8: 32 accumulators, 64 widened activations and 2 slabs of x in flight need the
//   255-register budget, which only a 256-thread block gets; this tile is compute-bound.
// - The per-row-group path (group_size % 8 != 0) holds 32 unpacked weights per slab, so
//   it keeps 2 slabs in flight to stay within 128 registers.
template <int MT, bool kAligned>
struct GemvConfig {
  static constexpr int kThreads = MT >= 8 ? 256 : 512;
  static constexpr int kUnroll = !kAligned ? 2 : (MT == 1 ? 8 : (MT == 2 ? 4 : 2));
};

// The 8 activations of one x row for qweight rows 8*slab .. 8*slab+7, packed 16-bit.
// kGather: act-order (x[perm[r]]) or an x that is not 16-byte aligned; otherwise one
// 16-byte load (rows stay aligned because K % 8 == 0).
template <bool kGather>
Q4_HD uint4 load_x8(const GemvArgs& a, const uint16_t* row, int slab) {
  if (!kGather) return load_ro<uint4>(row + 8 * slab);
  int32_t idx[8];
  if (a.perm != nullptr) {  // act-order: row r of qweight holds input row perm[r]
    const uint4 p0 = load_ro<uint4>(a.perm + 8 * slab), p1 = load_ro<uint4>(a.perm + 8 * slab + 4);
    idx[0] = int32_t(p0.x), idx[1] = int32_t(p0.y), idx[2] = int32_t(p0.z), idx[3] = int32_t(p0.w);
    idx[4] = int32_t(p1.x), idx[5] = int32_t(p1.y), idx[6] = int32_t(p1.z), idx[7] = int32_t(p1.w);
  } else {  // x not 16-byte aligned (an unusual view): same rows, scalar loads
#pragma unroll
    for (int j = 0; j < 8; ++j) idx[j] = 8 * slab + j;
  }
  uint32_t w[4];
#pragma unroll
  for (int p = 0; p < 4; ++p)
    w[p] = uint32_t(load_ro<uint16_t>(row + idx[2 * p])) | (uint32_t(load_ro<uint16_t>(row + idx[2 * p + 1])) << 16);
  return make_uint4(w[0], w[1], w[2], w[3]);
}

template <class D>
Q4_HD void widen8(const uint4& v, float f[8]) {
  D::pair(v.x, f[0], f[1]);
  D::pair(v.y, f[2], f[3]);
  D::pair(v.z, f[4], f[5]);
  D::pair(v.w, f[6], f[7]);
}

// One slab inside one group: acc[m][c] += a_c * sum_j x_mj f_jc + b_c * sum_j x_mj.
template <class D, int MT>
Q4_HD void slab_aligned(const uint4& qv, const uint4 (&xv)[MT], const GroupConst& gc,
                        float (&acc)[MT][4]) {
  float xf[MT][8], sx[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    widen8<D>(xv[m], xf[m]);
    sx[m] = ((xf[m][0] + xf[m][1]) + (xf[m][2] + xf[m][3])) + ((xf[m][4] + xf[m][5]) + (xf[m][6] + xf[m][7]));
  }
  const uint32_t q[4] = {qv.x, qv.y, qv.z, qv.w};
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    float f[8];
    unpack8(q[c], f);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      float raw = xf[m][0] * f[0];
#pragma unroll
      for (int j = 1; j < 8; ++j) raw = fmaf(xf[m][j], f[j], raw);
      acc[m][c] = fmaf(gc.a[c], raw, fmaf(gc.b[c], sx[m], acc[m][c]));
    }
  }
}

// group_size % 8 != 0: a slab can span groups, so dequantize each weight with its own
// row's group constants (exact: w = a*f + b has a single rounding of an exact value).
template <class D, int MT>
Q4_HD void slab_unaligned(const GemvArgs& a, const uint4& qv, const uint4 (&xv)[MT], int slab,
                          int64_t col0, int& g_end, GroupConst& gc, float (&acc)[MT][4]) {
  float xf[MT][8], f[4][8];
#pragma unroll
  for (int m = 0; m < MT; ++m) widen8<D>(xv[m], xf[m]);
  unpack8(qv.x, f[0]);
  unpack8(qv.y, f[1]);
  unpack8(qv.z, f[2]);
  unpack8(qv.w, f[3]);
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int r = 8 * slab + j;
    if (r >= g_end) {  // first row of a new group (rows arrive in increasing order)
      const int g = r / int(a.group_size);
      g_end = (g + 1) * int(a.group_size);
      load_group<D>(a.qzeros, a.scales, a.N, g, col0, gc);
    }
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float w = fmaf(gc.a[c], f[c][j], gc.b[c]);
#pragma unroll
      for (int m = 0; m < MT; ++m) acc[m][c] = fmaf(xf[m][j], w, acc[m][c]);
    }
  }
}

// Everything one thread contributes: columns col0..col0+3, activation rows m0..m0+MT-1,
// slabs of K-lane kl. Threads past N or past K return zeros (they still join the reduction).
template <class D, int MT, bool kAligned, bool kGather, int kThreads>
Q4_HD void thread_partial(const GemvArgs& a, int64_t col0, int kl, int64_t m0, float (&acc)[MT][4]) {
  constexpr int U = GemvConfig<MT, kAligned>::kUnroll;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[m][c] = 0.0f;
  if (col0 >= a.N) return;  // N % 4 == 0: a column thread is entirely in or out
  int sb, se;
  split_range(int(a.K / 8), GemvShape<kThreads>::kKLanes, kl, sb, se);  // K <= 2^30: the launcher checks
  if (sb >= se) return;
  const int64_t mrows = a.M - m0 < MT ? a.M - m0 : MT;
  const uint16_t* xrow = a.x + m0 * a.K;

  GroupConst gc;
  const int spg = int(a.group_size / 8);  // slabs per group (aligned path)
  int g = 0, g_next = 0;                  // aligned: current group, its end in slabs
  int g_end = 0;                          // unaligned: end row of the loaded group
  if (kAligned) {
    g = sb / spg;
    g_next = (g + 1) * spg;
    load_group<D>(a.qzeros, a.scales, a.N, g, col0, gc);
  }

  const int32_t* wp = a.qweight + int64_t(sb) * a.N + col0;
  for (int s = sb; s < se; s += U, wp += U * a.N) {
    // Issue every load of the U slabs first (qweight from DRAM, x from L2), then compute.
    uint4 qv[U], xv[U][MT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool live = s + u < se;
      qv[u] = live ? load_stream16(wp + u * a.N) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int m = 0; m < MT; ++m)
        xv[u][m] = live && m < mrows ? load_x8<kGather>(a, xrow + m * a.K, s + u) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int slab = s + u;
      if (slab < se) {
        if (kAligned) {
          if (slab == g_next) {
            ++g;
            g_next += spg;
            load_group<D>(a.qzeros, a.scales, a.N, g, col0, gc);
          }
          slab_aligned<D, MT>(qv[u], xv[u], gc, acc);
        } else {
          slab_unaligned<D, MT>(a, qv[u], xv[u], slab, col0, g_end, gc, acc);
        }
      }
    }
  }
}

// Final value of out[m][n] from the per-warp partials: warps summed 0..W-1, then bias.
template <class D>
Q4_HD uint16_t finish_output(const float* partials, int stride, int warps, const uint16_t* bias, int64_t n) {
  float v = 0.0f;
  for (int w = 0; w < warps; ++w) v += partials[w * stride];
  if (bias != nullptr) v += D::to_float(load_ro<uint16_t>(bias + n));
  return D::from_float(v);
}

// grid = (ceil(N / 32), ceil(M / MT)); block = GemvConfig<MT, kAligned>::kThreads.
template <class D, int MT, bool kAligned, bool kGather>
__global__ void __launch_bounds__(GemvConfig<MT, kAligned>::kThreads) gemv_4bit_kernel(const GemvArgs a) {
  constexpr int kThreads = GemvConfig<MT, kAligned>::kThreads;
  using Shape = GemvShape<kThreads>;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int ct = lane & 7;                // column thread within the tile
  const int kl = warp * 4 + (lane >> 3);  // K-lane: 4 per warp
  const int64_t col0 = int64_t(blockIdx.x) * Shape::kTileN + 4 * ct;
  const int64_t m0 = int64_t(blockIdx.y) * MT;

  float acc[MT][4];
  thread_partial<D, MT, kAligned, kGather, kThreads>(a, col0, kl, m0, acc);

  // Lanes ct, ct+8, ct+16, ct+24 share the columns: after the two xor steps every one of
  // them holds (p0 + p1) + (p2 + p3) (fp add is commutative, so partners agree bitwise).
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], 8);
      acc[m][c] += __shfl_xor_sync(0xffffffffu, acc[m][c], 16);
    }

  __shared__ float red[Shape::kWarps][MT][Shape::kTileN];
  if (lane < 8) {
#pragma unroll
    for (int m = 0; m < MT; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[warp][m][4 * ct + c] = acc[m][c];
  }
  __syncthreads();

  // One thread per output of the tile (MT * 32 <= kThreads).
  static_assert(MT * Shape::kTileN <= kThreads, "one thread per output");
  if (tid < MT * Shape::kTileN) {
    const int m = tid / Shape::kTileN, col = tid % Shape::kTileN;
    const int64_t n = int64_t(blockIdx.x) * Shape::kTileN + col;
    if (n < a.N && m0 + m < a.M)
      a.out[(m0 + m) * a.N + n] = finish_output<D>(&red[0][m][col], MT * Shape::kTileN, Shape::kWarps, a.bias, n);
  }
}
}  // namespace q4
}  // namespace quant_cuda
