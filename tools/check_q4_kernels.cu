// Host-side check of the CUDA kernels' index math and arithmetic, for machines without a
// GPU. It runs the kernels' own __host__ __device__ per-thread code (q4_*.cuh) for every
// thread of every block, emulates what only the GPU does (warp shuffles, mma.sync with
// the fragment layout of the PTX ISA, shared-memory reduction) in the kernels' order, and
// compares with a float64 reference. It also checks that every output element is written
// exactly once.
//
//   nvcc -std=c++17 -O2 -I quant_cuda tools/check_q4_kernels.cu -o /tmp/check_q4 && /tmp/check_q4
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "q4_dequant.cuh"
#include "q4_gemv.cuh"
#include "q4_mma.cuh"

using namespace quant_cuda::q4;

struct Layer {
  int64_t M, K, N, gs;
  std::vector<int32_t> qweight, qzeros, perm;
  std::vector<uint16_t> scales, x, bias;
  std::vector<int> codes, zeros;  // [K][N], [G][N] true zeros
  std::vector<double> sc;         // [G][N]
};

template <class D>
Layer make_layer(int64_t M, int64_t K, int64_t N, int64_t gs, bool act_order, bool bias, uint32_t seed) {
  std::mt19937 rng(seed);
  Layer L{M, K, N, gs};
  const int64_t G = (K + gs - 1) / gs;
  L.codes.resize(K * N);
  L.zeros.resize(G * N);
  L.sc.resize(G * N);
  L.scales.resize(G * N);
  L.qweight.assign(K / 8 * N, 0);
  L.qzeros.assign(G * N / 8, 0);
  for (auto& c : L.codes) c = rng() % 16;
  for (int64_t i = 0; i < G * N; ++i) {
    L.zeros[i] = 1 + rng() % 16;  // v1 can express 1..16
    L.scales[i] = D::from_float(0.001f + 0.02f * float(rng() % 1000) / 1000.0f);
    L.sc[i] = D::to_float(L.scales[i]);
    L.qzeros[(i / N) * (N / 8) + (i % N) / 8] |= int32_t(uint32_t(L.zeros[i] - 1) << (4 * (i % 8)));
  }
  for (int64_t r = 0; r < K; ++r)
    for (int64_t n = 0; n < N; ++n)
      L.qweight[(r / 8) * N + n] |= int32_t(uint32_t(L.codes[r * N + n]) << (4 * (r % 8)));
  L.x.resize(M * K);
  for (auto& v : L.x) v = D::from_float(float(int(rng() % 2001) - 1000) / 250.0f);
  if (act_order) {
    L.perm.resize(K);
    for (int64_t i = 0; i < K; ++i) L.perm[i] = int32_t(i);
    std::shuffle(L.perm.begin(), L.perm.end(), rng);
  }
  if (bias) {
    L.bias.resize(N);
    for (auto& v : L.bias) v = D::from_float(float(int(rng() % 200) - 100) / 50.0f);
  }
  return L;
}

GemvArgs args_of(Layer& L, std::vector<uint16_t>& out) {
  GemvArgs a;
  a.x = L.x.data(), a.qweight = L.qweight.data(), a.qzeros = L.qzeros.data(), a.scales = L.scales.data();
  a.perm = L.perm.empty() ? nullptr : L.perm.data();
  a.bias = L.bias.empty() ? nullptr : L.bias.data();
  a.out = out.data();
  a.M = L.M, a.K = L.K, a.N = L.N, a.group_size = L.gs;
  return a;
}

// round_w: weights rounded to the dtype first, as the tensor-core kernel (and the
// reference path, dequantize-then-matmul) does; the CUDA-core kernel keeps them in fp32.
template <class D>
double reference(const Layer& L, int64_t m, int64_t n, bool round_w) {
  double acc = 0;
  for (int64_t r = 0; r < L.K; ++r) {
    const int64_t g = r / L.gs;
    double w = L.sc[g * L.N + n] * (L.codes[r * L.N + n] - L.zeros[g * L.N + n]);
    if (round_w) w = D::to_float(D::from_float(float(w)));
    acc += double(D::to_float(L.x[m * L.K + (L.perm.empty() ? r : L.perm[r])])) * w;
  }
  if (!L.bias.empty()) acc += D::to_float(L.bias[n]);
  return acc;
}

int failures = 0;

template <class D>
void compare(const char* what, const Layer& L, const std::vector<uint16_t>& out, const std::vector<int>& writes,
             bool round_w) {
  double worst = 0;
  int bad_writes = 0;
  for (int64_t m = 0; m < L.M; ++m)
    for (int64_t n = 0; n < L.N; ++n) {
      if (writes[m * L.N + n] != 1) ++bad_writes;
      const double ref = reference<D>(L, m, n, round_w);
      // tolerance: output rounding (fp16 2^-11, bf16 2^-8) plus fp32-sum noise
      const double tol = (std::is_same<D, Fp16>::value ? 1e-3 : 8e-3) * (std::fabs(ref) + 1.0);
      worst = std::max(worst, std::fabs(D::to_float(out[m * L.N + n]) - ref) / tol);
    }
  const bool ok = bad_writes == 0 && worst <= 1.0;
  failures += !ok;
  std::printf("%-4s %-10s M=%-3lld K=%-5lld N=%-4lld gs=%-4lld perm=%d bias=%d  err/tol=%.3f  bad writes=%d  %s\n",
              std::is_same<D, Fp16>::value ? "fp16" : "bf16", what, (long long)L.M, (long long)L.K, (long long)L.N,
              (long long)L.gs, !L.perm.empty(), !L.bias.empty(), worst, bad_writes, ok ? "ok" : "FAIL");
}

// gemv_4bit_kernel<D, MT, kAligned, kGather> for every block and thread.
template <class D, int MT, bool kAligned, bool kGather>
void run_gemv(Layer& L) {
  constexpr int kThreads = GemvConfig<MT, kAligned>::kThreads;
  using S = GemvShape<kThreads>;
  std::vector<uint16_t> out(L.M * L.N, 0xffff);
  std::vector<int> writes(L.M * L.N, 0);
  const GemvArgs a = args_of(L, out);
  for (int64_t bx = 0; bx < (L.N + S::kTileN - 1) / S::kTileN; ++bx)
    for (int64_t by = 0; by < (L.M + MT - 1) / MT; ++by) {
      static float acc[kThreads][MT][4];
      for (int tid = 0; tid < kThreads; ++tid) {
        const int warp = tid >> 5, lane = tid & 31, ct = lane & 7, kl = warp * 4 + (lane >> 3);
        thread_partial<D, MT, kAligned, kGather, kThreads>(a, bx * S::kTileN + 4 * ct, kl, by * MT, acc[tid]);
      }
      static float red[S::kWarps][MT][S::kTileN];
      for (int warp = 0; warp < S::kWarps; ++warp)
        for (int ct = 0; ct < 8; ++ct)
          for (int m = 0; m < MT; ++m)
            for (int c = 0; c < 4; ++c) {  // xor 8 then xor 16, as the shuffles do for lane ct
              const float* p[4];
              for (int q = 0; q < 4; ++q) p[q] = &acc[warp * 32 + ct + 8 * q][m][c];
              red[warp][m][4 * ct + c] = (*p[0] + *p[1]) + (*p[2] + *p[3]);
            }
      for (int tid = 0; tid < MT * S::kTileN; ++tid) {
        const int m = tid / S::kTileN, col = tid % S::kTileN;
        const int64_t n = bx * S::kTileN + col, row = by * MT + m;
        if (n < L.N && row < L.M) {
          out[row * L.N + n] = finish_output<D>(&red[0][m][col], MT * S::kTileN, S::kWarps, a.bias, n);
          ++writes[row * L.N + n];
        }
      }
    }
  char what[32];
  std::snprintf(what, sizeof what, "gemv%d%s%s", MT, kAligned ? "" : "-rows", kGather ? "-g" : "");
  compare<D>(what, L, out, writes, false);
}

// mma_4bit_kernel<D, MT, kGather>: the kernel's loop, with mma.sync emulated per the PTX
// fragment layout for m16n8k16 (A: row g + 8 (r & 1), k 2t + h + 8 (r >> 1); B: k 2t + h + 8r,
// column g; D: row g + 8 (i >> 1), column 2t + (i & 1)).
template <class D, int MT, bool kGather>
void run_mma(Layer& L) {
  using C = MmaConfig<MT, kGather>;
  constexpr int U = C::kUnroll;
  std::vector<uint16_t> out(L.M * L.N, 0xffff);
  std::vector<int> writes(L.M * L.N, 0);
  const GemvArgs a = args_of(L, out);
  auto half_of = [](uint32_t reg, int h) { return D::to_float(uint16_t(h ? reg >> 16 : reg & 0xffff)); };
  for (int64_t bx = 0; bx < (L.N + C::kTileN - 1) / C::kTileN; ++bx)
    for (int64_t by = 0; by < (L.M + MT - 1) / MT; ++by) {
      static float red[C::kWarps][MT][C::kTileN];
      const int64_t m0 = by * MT;
      for (int warp = 0; warp < C::kWarps; ++warp) {
        float d[32][4][4] = {};
        int sb, se;
        split_range(int(L.K / 32), C::kWarps, warp, sb, se);
        const int spg = int(L.gs / 8);
        int g_next[32] = {};
        MmaGroup mg[32];
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 4; ++i) mg[lane].zero2[i] = Magic<D>::kBits * 0x10001u, mg[lane].scale2[i] = 0;
        for (int s = sb; s < se; s += U)
          for (int u = 0; u < U && s + u < se; ++u) {
            uint32_t A[32][2][4], B[32][4][2][2];  // per lane: [k][reg], [tile][k][reg]
            for (int lane = 0; lane < 32; ++lane) {
              const int g = lane >> 2, t = lane & 3, slab = 4 * (s + u) + t;
              const int64_t col0 = bx * C::kTileN + 4 * g;
              const bool col_live = col0 < L.N;
              const bool row0_live = m0 + g < L.M, row1_live = MT == 16 && m0 + g + 8 < L.M;
              const uint4 qv = col_live ? load_stream16(a.qweight + int64_t(slab) * L.N + col0) : make_uint4(0, 0, 0, 0);
              const uint4 xv0 = row0_live ? load_x8<kGather>(a, a.x + (m0 + g) * L.K, slab) : make_uint4(0, 0, 0, 0);
              const uint4 xv1 = row1_live ? load_x8<kGather>(a, a.x + (m0 + g + 8) * L.K, slab) : make_uint4(0, 0, 0, 0);
              if (col_live && slab >= g_next[lane]) {
                const int grp = slab / spg;
                g_next[lane] = (grp + 1) * spg;
                load_mma_group<D>(a, grp, col0, mg[lane]);
              }
              uint32_t b[4][2][2], a0[2][2], a1[2][2] = {{0, 0}, {0, 0}};
              b_fragments<D>(qv, mg[lane], b);
              a_fragments(xv0, a0);
              if (MT == 16) a_fragments(xv1, a1);
              for (int k = 0; k < 2; ++k) {
                A[lane][k][0] = a0[k][0], A[lane][k][1] = a1[k][0], A[lane][k][2] = a0[k][1], A[lane][k][3] = a1[k][1];
                for (int i = 0; i < 4; ++i) B[lane][i][k][0] = b[i][k][0], B[lane][i][k][1] = b[i][k][1];
              }
            }
            for (int i = 0; i < 4; ++i)
              for (int k = 0; k < 2; ++k) {
                float Am[16][16], Bm[16][8];
                for (int lane = 0; lane < 32; ++lane) {
                  const int g = lane >> 2, t = lane & 3;
                  for (int r = 0; r < 4; ++r)
                    for (int h = 0; h < 2; ++h) Am[g + 8 * (r & 1)][2 * t + h + 8 * (r >> 1)] = half_of(A[lane][k][r], h);
                  for (int r = 0; r < 2; ++r)
                    for (int h = 0; h < 2; ++h) Bm[2 * t + h + 8 * r][g] = half_of(B[lane][i][k][r], h);
                }
                for (int lane = 0; lane < 32; ++lane) {
                  const int g = lane >> 2, t = lane & 3;
                  for (int e = 0; e < 4; ++e) {
                    const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
                    float v = d[lane][i][e];
                    for (int kk = 0; kk < 16; ++kk) v += Am[row][kk] * Bm[kk][col];
                    d[lane][i][e] = v;
                  }
                }
              }
          }
        for (int lane = 0; lane < 32; ++lane) {
          const int g = lane >> 2, t = lane & 3;
          for (int i = 0; i < 4; ++i)
            for (int r = 0; r < 4; ++r) {
              const int row = g + 8 * (r / 2);
              if (row < MT) red[warp][row][4 * (2 * t + r % 2) + i] = d[lane][i][r];
            }
        }
      }
      for (int tid = 0; tid < MT * C::kTileN; ++tid) {
        const int row = tid / C::kTileN, col = tid % C::kTileN;
        const int64_t n = bx * C::kTileN + col;
        if (n < L.N && m0 + row < L.M) {
          out[(m0 + row) * L.N + n] = finish_output<D>(&red[0][row][col], MT * C::kTileN, C::kWarps, a.bias, n);
          ++writes[(m0 + row) * L.N + n];
        }
      }
    }
  compare<D>(MT == 8 ? (kGather ? "mma8-g" : "mma8") : (kGather ? "mma16-g" : "mma16"), L, out, writes, true);
}

// dequant_4bit_kernel: every (slab, column thread); must equal dtype(scale * (code - zero)).
template <class D>
void run_dequant(Layer& L) {
  std::vector<uint16_t> out(L.K * L.N, 0xffff);
  DequantArgs a{L.qweight.data(), L.qzeros.data(), L.scales.data(), out.data(), L.K, L.N, L.gs};
  for (int64_t slab = 0; slab < L.K / 8; ++slab)
    for (int64_t col0 = 0; col0 < L.N; col0 += 4) dequant_thread<D>(a, slab, col0);
  int mismatches = 0;
  for (int64_t r = 0; r < L.K; ++r)
    for (int64_t n = 0; n < L.N; ++n) {
      const int64_t g = r / L.gs;
      const float w = float(L.sc[g * L.N + n]) * float(L.codes[r * L.N + n] - L.zeros[g * L.N + n]);
      mismatches += out[r * L.N + n] != D::from_float(w);
    }
  failures += mismatches != 0;
  std::printf("%-4s %-10s K=%-5lld N=%-4lld gs=%-4lld  bitwise mismatches=%d  %s\n",
              std::is_same<D, Fp16>::value ? "fp16" : "bf16", "dequant", (long long)L.K, (long long)L.N,
              (long long)L.gs, mismatches, mismatches ? "FAIL" : "ok");
}

template <class D>
void run_all() {
  struct Case { int64_t M, K, N, gs; bool perm, bias; };
  const Case cases[] = {
      {1, 576, 24, 128, false, false}, {3, 576, 8, 128, false, true},  {5, 576, 40, 128, true, false},
      {1, 256, 64, 32, false, true},   {2, 8, 8, 8, false, false},     {4, 24, 16, 8, true, true},
      {9, 64, 8, 64, false, false},    {1, 576, 24, 576, false, false}, {2, 96, 32, 12, false, true},
      {1, 40, 16, 5, true, false},     {17, 128, 24, 32, true, true},   {1, 1024, 48, 128, false, false},
  };
  uint32_t seed = 1;
  for (const Case& c : cases) {
    Layer L = make_layer<D>(c.M, c.K, c.N, c.gs, c.perm, c.bias, seed++);
    if (c.gs % 8 == 0) {
      if (c.perm) {
        run_gemv<D, 1, true, true>(L), run_gemv<D, 8, true, true>(L);
      } else {
        run_gemv<D, 1, true, false>(L), run_gemv<D, 2, true, false>(L), run_gemv<D, 4, true, false>(L);
        run_gemv<D, 8, true, false>(L);
      }
      if (c.K % 32 == 0)
        c.perm ? (run_mma<D, 8, true>(L), run_mma<D, 16, true>(L)) : (run_mma<D, 8, false>(L), run_mma<D, 16, false>(L));
    } else {
      run_gemv<D, 1, false, true>(L), run_gemv<D, 8, false, true>(L);
    }
    run_dequant<D>(L);
  }
}

int main() {
  run_all<Fp16>();
  run_all<Bf16>();
  std::printf(failures ? "%d FAILED\n" : "all ok\n", failures);
  return failures != 0;
}
