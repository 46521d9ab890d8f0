// AMX body of the 4-bit CPU GEMM for M >= 2 (Intel Sapphire Rapids and later):
// cpu_kernels_avx512.cpp at M = 1, this from 2 rows on. Compiled like the AVX-512 body
// (target attributes only); cpu_isa.cpp enables it only once the OS has granted this
// process the AMX tile state (arch_prctl, Linux 5.16+).
//
// Why: the AVX-512 body costs 6 vpdpbusd per 64 bytes of qweight for every activation
// row, so M rows cost ~M times one row (M = 8 measured 6x the time of M = 1 with the
// weights hot). One tdpbsud multiplies a 16 x 64 tile of signed bytes (A: the three
// activation digits of up to 5 rows, 15 rows used) by a 64 x 16 tile of unsigned bytes
// (B: 16 columns' codes) into a 16 x 16 int32 tile, in about the time of 16 vpdpbusd: the
// cost per weight hardly grows with M (hot 4096 x 512: M = 8 1.3x, M = 16 2.2x the M = 1
// time).
//
// B tiles: row 2j of a block holds the low nibbles of packed row j (k = 8j + 0,2,4,6)
// of 16 columns, 4 bytes per column, row 2j+1 the high nibbles (k = 8j + 1,3,5,7): the
// same split as the AVX-512 body, stored to a buffer (`tiles`) and loaded as a tile. A
// tiles: amx_layout (cpu_kernels.h), whose byte order per kp matches those rows. Per
// group and 64 columns, the group's weights are split once and reused by every pass
// of up to 5 rows; C tiles (one per 16 columns) are folded into acc per group exactly as
// in the AVX-512 body: acc += scale * xscale * ((65536 A + 256 B + C) - zero * sum(q)).
#if defined(__x86_64__)
#include "cpu_avx512.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define QC_AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,amx-tile,amx-int8")))

// Tile instructions as asm with a memory clobber: the compiler must not move the stores
// that fill a buffer past the tile load that reads it (GCC 12's _tile_loadd has no
// memory operand). Tile numbers are immediates.
#define QC_TILE_LOAD(t, base, stride)                                                                    \
  __asm__ volatile("{tileloadd\t(%0,%1,1), %%tmm" #t "|tileloadd\t%%tmm" #t ", [%0+%1*1]}" ::"r"(base), \
                   "r"((long)(stride))                                                                   \
                   : "memory")
#define QC_TILE_STORE(t, base, stride)                                                                    \
  __asm__ volatile("{tilestored\t%%tmm" #t ", (%0,%1,1)|tilestored\t[%0+%1*1], %%tmm" #t "}" ::"r"(base), \
                   "r"((long)(stride))                                                                    \
                   : "memory")
#define QC_TILE_ZERO(t) __asm__ volatile("tilezero\t%%tmm" #t ::)
// C (tile c) += A (tile a, signed bytes) . B (tile b, unsigned bytes)
#define QC_TILE_DPBSUD(c, a, b) \
  __asm__ volatile("{tdpbsud\t%%tmm" #b ", %%tmm" #a ", %%tmm" #c "|tdpbsud\t%%tmm" #c ", %%tmm" #a ", %%tmm" #b "}" ::)

namespace quant_cuda {
namespace cpu {

using namespace avx512;

namespace {

// ldtilecfg's 64-byte operand (palette 1).
struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

constexpr int64_t kMaxRowsPerPass = 5;  // 3 digit rows each: 15 of the 16 rows of a tile

int64_t gcd(int64_t a, int64_t b) { return b ? gcd(b, a % b) : a; }

// tmm0..3: C of the 4 column blocks of a 64-column tile; tmm4: A; tmm5, tmm6: B.
QC_AMX void load_config(const AmxPlan& p) {
  TileConfig cfg{};
  cfg.palette_id = 1;
  const uint8_t rows = uint8_t(3 * p.rows_per_pass);
  for (int t = 0; t < 4; ++t) {
    cfg.rows[t] = rows;
    cfg.colsb[t] = 64;
  }
  cfg.rows[4] = rows;
  cfg.colsb[4] = uint16_t(p.kb);
  for (int t = 5; t < 7; ++t) {
    cfg.rows[t] = uint8_t(p.kb / 4);
    cfg.colsb[t] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Splits packed rows [kp0, kp0 + kb/8) of 16 columns into one B tile (kb/4 rows of 64 bytes).
// prefetch: also ask for the same columns of the next group (as the AVX-512 body).
QC_AMX inline void split_block(const GemmArgs& a, int64_t kp0, int64_t kb, int64_t col, __mmask16 mask,
                               bool prefetch, uint8_t* tile) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int64_t j = 0; j < kb / 8; ++j) {
    const int32_t* wp = qweight_column(a, col) + (kp0 + j) * qweight_stride(a);
    if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wp + a.group_size / 8 * qweight_stride(a)), _MM_HINT_T0);
    const __m512i w = _mm512_maskz_loadu_epi32(mask, wp);
    _mm512_store_si512(tile + 128 * j, _mm512_and_si512(w, low4));
    _mm512_store_si512(tile + 128 * j + 64, _mm512_and_si512(_mm512_srli_epi32(w, 4), low4));
  }
}

// acc[m, col..] += scale * xscale * ((65536 A + 256 B + C) - zero * sum(q)) for the rows
// [m0, m1) of one pass; c: the stored C tile (row 3i + d: digit d of row m0 + i).
QC_AMX inline void fold_group(const GemmArgs& a, int64_t g, int64_t col, __mmask16 mask, int64_t m0, int64_t m1,
                              const int32_t* c, float* acc) {
  const __m512 scale = load16(a.scales, a.dtype, g * a.N + col, mask);
  const __m512 zero = zeros16(a.qzeros + g * (a.N / 8) + col / 8, mask);
  for (int64_t m = m0; m < m1; ++m) {
    const int32_t* r = c + 3 * (m - m0) * 16;
    __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(r + 16)), _mm512_set1_ps(256.0f),
                               _mm512_cvtepi32_ps(_mm512_load_si512(r + 32)));
    t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(r)), _mm512_set1_ps(65536.0f), t);
    t = _mm512_fnmadd_ps(zero, _mm512_set1_ps(a.xsum[m * a.G + g]), t);
    const __m512 step = _mm512_mul_ps(scale, _mm512_set1_ps(a.xscale[m * a.G + g]));
    float* ap = acc + m * a.N + col;
    _mm512_mask_storeu_ps(ap, mask, _mm512_fmadd_ps(step, t, _mm512_maskz_loadu_ps(mask, ap)));
  }
}

}  // namespace

AmxPlan amx_plan(int64_t M, int64_t K, int64_t group_size) {
  // kb: rows of K per tile product, a multiple of 8 dividing both the group size and K
  // (64 for every real layer), so that no block straddles two groups.
  const int64_t kb = 8 * gcd(8, gcd(group_size / 8, K / 8));
  const int64_t per_pass = M < kMaxRowsPerPass ? M : kMaxRowsPerPass;
  return {kb, per_pass, (M + per_pass - 1) / per_pass * per_pass};
}

// The C tiles of one pass, stored, waiting to be folded into acc.
struct Pending {
  int64_t g, c, m0, m1;
  int nc;
  const int32_t* tiles;  // [4][16 * 16]
};

QC_AMX inline void fold(const GemmArgs& a, int64_t c1, const Pending& p, float* acc) {
  for (int v = 0; v < p.nc; ++v)
    fold_group(a, p.g, p.c + 16 * v, lane_mask(c1 - p.c - 16 * v), p.m0, p.m1, p.tiles + v * 256, acc);
}

QC_AMX void gemm_chunk_amx(const GemmArgs& a, const AmxPlan& p, int64_t c0, int64_t c1, float* acc,
                           uint8_t* tiles) {
  load_config(p);  // per task: other code on this thread (oneDNN) may have loaded its own
  const int64_t kb = p.kb, tile_bytes = kb / 4 * 64, group_bytes = 4 * (a.group_size / kb) * tile_bytes;
  // Software pipeline: the tile products of one pass run on the AMX unit while the vector
  // units fold the previous pass into acc and split the next weights (into the other
  // half of `tiles`); done in order, each step would wait for the one before.
  alignas(64) int32_t c_tiles[2][4 * 16 * 16];
  Pending pending{};
  bool have_pending = false;
  int64_t unit = 0, job = 0;
  for (int64_t g = 0; g < a.G; ++g) {
    const int64_t kp0 = g * a.group_size / 8;
    const int64_t kp1 = (g + 1) * a.group_size / 8 < a.K / 8 ? (g + 1) * a.group_size / 8 : a.K / 8;
    const int64_t blocks = (kp1 - kp0) * 8 / kb, block0 = kp0 * 8 / kb;
    for (int64_t c = c0; c < c1; c += 64, ++unit) {
      const __mmask16 mask[4] = {lane_mask(c1 - c), lane_mask(c1 - c - 16), lane_mask(c1 - c - 32),
                                 lane_mask(c1 - c - 48)};
      const int nc = mask[3] ? 4 : mask[2] ? 3 : mask[1] ? 2 : 1;
      uint8_t* bt0 = tiles + (unit & 1) * group_bytes;
      for (int64_t b = 0; b < blocks; ++b)
        for (int v = 0; v < nc; ++v)
          split_block(a, kp0 + b * kb / 8, kb, c + 16 * v, mask[v], g + 1 < a.G, bt0 + (b * 4 + v) * tile_bytes);

      for (int64_t m0 = 0; m0 < a.M; m0 += p.rows_per_pass, ++job) {
        QC_TILE_ZERO(0);
        QC_TILE_ZERO(1);
        QC_TILE_ZERO(2);
        QC_TILE_ZERO(3);
        for (int64_t b = 0; b < blocks; ++b) {
          QC_TILE_LOAD(4, a.xq + ((block0 + b) * p.padded_rows + m0) * 3 * kb, kb);
          const uint8_t* bt = bt0 + b * 4 * tile_bytes;
          QC_TILE_LOAD(5, bt, 64);
          QC_TILE_DPBSUD(0, 4, 5);
          if (nc > 1) {
            QC_TILE_LOAD(6, bt + tile_bytes, 64);
            QC_TILE_DPBSUD(1, 4, 6);
          }
          if (nc > 2) {
            QC_TILE_LOAD(5, bt + 2 * tile_bytes, 64);
            QC_TILE_DPBSUD(2, 4, 5);
          }
          if (nc > 3) {
            QC_TILE_LOAD(6, bt + 3 * tile_bytes, 64);
            QC_TILE_DPBSUD(3, 4, 6);
          }
        }
        int32_t* ct = c_tiles[job & 1];
        QC_TILE_STORE(0, ct, 64);
        QC_TILE_STORE(1, ct + 256, 64);
        QC_TILE_STORE(2, ct + 512, 64);
        QC_TILE_STORE(3, ct + 768, 64);
        if (have_pending) fold(a, c1, pending, acc);
        pending = {g, c, m0, m0 + p.rows_per_pass < a.M ? m0 + p.rows_per_pass : a.M, nc, ct};
        have_pending = true;
      }
    }
  }
  if (have_pending) fold(a, c1, pending, acc);
  _tile_release();
  store_chunk_avx512(a, c0, c1, acc);
}

bool amx_usable() {
#if defined(__linux__)
  if (!__builtin_cpu_supports("amx-tile") || !__builtin_cpu_supports("amx-int8")) return false;
  // Linux hands out the 8 KB tile state only to processes that ask (ARCH_REQ_XCOMP_PERM
  // for XFEATURE_XTILEDATA); without it the first tile instruction would kill the process.
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace quant_cuda

#else  // not x86-64: amx_usable() is false, the rest is never called.
#include "cpu_kernels.h"
namespace quant_cuda {
namespace cpu {
AmxPlan amx_plan(int64_t M, int64_t, int64_t) { return {64, M, M}; }
void gemm_chunk_amx(const GemmArgs&, const AmxPlan&, int64_t, int64_t, float*, uint8_t*) {}
bool amx_usable() { return false; }
}  // namespace cpu
}  // namespace quant_cuda
#endif
