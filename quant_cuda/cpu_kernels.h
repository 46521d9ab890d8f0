// Internal interface between the CPU entry points (cpu_kernels.cpp) and their bodies:
// AVX-512 VNNI (cpu_kernels_avx512.cpp), AVX2 + FMA (cpu_kernels_avx2.cpp) and scalar
// (cpu_kernels_scalar.cpp), one chosen at run time (cpu_isa.cpp). Torch-free.
//
// Activations, AVX2 and scalar bodies: the kernels never shift nibbles down. Code j
// of a word (j < 7) is isolated in place with `word & (0xF << 4j)`, which as an int32
// equals q * 16^j exactly; the activation it meets was pre-scaled by 16^-j (an exact
// power-of-two scale), so the product is q * x. Nibble 7 would set the sign bit, so it
// is shifted down (>> 28, logical) and its activation is left unscaled.
//
// Activations, AVX-512 body: each group of a row is put on a 24-bit integer grid,
// x = xscale * q with q = round(x / xscale), xscale = max|x| / kActMax, and q is
// split into three signed 8-bit digits, q = 65536 a + 256 b + c, for the VNNI byte dot
// products (vpdpbusd: unsigned 4-bit codes times signed digits). Rounding moves each x
// by at most xscale / 2 = 1.004 * 2^-24 * max|x| of its group: the size of one fp32
// rounding of the group's largest term, which the fp32 paths also pay per addition.
#pragma once
#include <cstdint>
#include <cstring>

namespace quant_cuda {
namespace cpu {

// Largest |q| of the AVX-512 activation grid: 127 * (65536 + 256 + 1), the most that
// three balanced signed digits in [-128, 127] hold symmetrically.
constexpr int32_t kActMax = 8355711;

struct GemmArgs {
  const float* x;        // AVX2/scalar: [M, K] fp32, rows of qweight's order, pre-scaled as above
  const int8_t* xq;      // AVX-512: digits, M = 1 or no AMX: [M, K/8, 24]; AMX: amx_layout
  const float* xscale;   // AVX-512: [M, G] grid step of each group
  const float* xsum;     // [M, G] per group: sum of the activations (AVX-512: sum of q)
  const int32_t* qweight;
  const int32_t* qzeros;
  const void* scales;    // [G, N] fp32 or bf16 (dtype)
  const void* bias;      // [N] or nullptr
  void* out;             // [M, N], dtype
  int64_t M, K, N, G, group_size;
  int dtype;
  int64_t block;  // qweight's column block width W, 0: [K/8, N] (kernels.h); a task's columns lie in one block
};

// qweight's word for packed row 0 of column c, and the distance between packed rows there.
inline const int32_t* qweight_column(const GemmArgs& a, int64_t c) {
  return a.block ? a.qweight + ((c / a.block) * (a.K / 8)) * a.block + c % a.block : a.qweight + c;
}
inline int64_t qweight_stride(const GemmArgs& a) { return a.block ? a.block : a.N; }

// Scale applied to the activation met by nibble j (see the comment at the top).
inline float nibble_scale(int j) { return j == 7 ? 1.0f : 1.0f / float(1 << (4 * j)); }

// Adds groups [g0, g1) of columns [c0, c0 + width) to the fp32 accumulator acc [M, N]
// for all M rows; width is 8 or 32. The entry point writes `out` from acc at the end.
// (AVX2 and scalar.)
void gemm_columns_avx2(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1, float* acc);
void gemm_columns_scalar(const GemmArgs& a, int64_t c0, int64_t width, int64_t g0, int64_t g1, float* acc);

// Rows [8 * kp, 8 * kp + 8) of the dequantized W^T [K, N].
void dequant_packed_row_avx2(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                             void* out, int64_t kp, int64_t N, int64_t group_size, int dtype);
void dequant_packed_row_scalar(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                               void* out, int64_t kp, int64_t N, int64_t group_size, int dtype);

// Where the digits of one activation row go. Each packed row kp (8 rows of K) has 8
// bytes per digit, in the order 0,2,4,6,1,3,5,7 (the order in which the low and high
// nibbles of a packed byte meet them); digit d of kp lies at at(kp) + d * digit_stride.
struct DigitLayout {
  int8_t* base;
  int64_t block_kps, block_stride, kp_stride, digit_stride;
  int8_t* at(int64_t kp) const { return base + kp / block_kps * block_stride + kp % block_kps * kp_stride; }
};
// AVX-512 layout of row m: [M, K/8, 24] (digits a, b, c of each kp together).
inline DigitLayout avx512_layout(int8_t* xq, int64_t m, int64_t K) { return {xq + m * K * 3, K / 8, 0, 24, 8}; }

// AVX-512: one row of activations (fp32, qweight's row order) to its digits;
// xscale[g] and xsum[g] (sum of q) per group; a group with a NaN or inf gets xscale NaN.
void activation_digits_avx512(const float* x, int64_t K, int64_t group_size, const DigitLayout& out,
                              float* xscale, float* xsum);
// Columns [c0, c1) for all rows, all groups: acc [M, N] (zero on entry for those
// columns) is used as scratch; writes out[:, c0:c1] with bias, in the output dtype.
void gemm_chunk_avx512(const GemmArgs& a, int64_t c0, int64_t c1, float* acc);
// Writes out[:, c0:c1] = acc[:, c0:c1] (+ bias) in the output dtype.
void store_chunk_avx512(const GemmArgs& a, int64_t c0, int64_t c1, const float* acc);

// ---- AMX (cpu_kernels_amx.cpp), for M >= 2 ----------------------------------------------
// The activation digits of `rows_per_pass` rows form one A tile per block of kb rows of K:
// layout [K / kb, padded_rows, 3, kb] (rows past M zero), row m's digit d of block b at
// ((b * padded_rows + m) * 3 + d) * kb.
struct AmxPlan {
  int64_t kb, rows_per_pass, padded_rows;
};
AmxPlan amx_plan(int64_t M, int64_t K, int64_t group_size);
inline DigitLayout amx_layout(int8_t* xq, int64_t m, const AmxPlan& p) {
  return {xq + m * 3 * p.kb, p.kb / 8, p.padded_rows * 3 * p.kb, 8, p.kb};
}
// As gemm_chunk_avx512, with AMX tiles; tiles: >= 128 * group_size bytes of scratch.
void gemm_chunk_amx(const GemmArgs& a, const AmxPlan& p, int64_t c0, int64_t c1, float* acc, uint8_t* tiles);
bool amx_usable();  // the CPU has AMX-INT8 and the OS let this process use it

// ---- int8 GEMM (kernels.h gemm_int8_cpu) ---------------------------------------------
// The AVX-512 body puts each activation row on the same 24-bit grid as above (one step
// for the whole row) and stores its digits as three planes in natural order, since here
// a zmm of weights holds 64 consecutive k of one output row (vpdpbusd with the weights
// as the unsigned operand: w + 128, corrected by the -128 * digit sums the accumulators
// start from).
struct Int8Args {
  const float* x;        // AVX2/scalar: [M, K] fp32 activations
  const int8_t* xq;      // AVX-512: [M, 3, Kp] digit planes a, b, c (Kp = K rounded up to 64; zero padded)
  const int32_t* xinit;  // AVX-512: [M, 3, 16] -128 * the lane sums of each plane
  const float* xscale;   // AVX-512: [M] grid step of each row
  const int8_t* weight;  // [N, K]
  const void* scale;     // [N], dtype
  const void* bias;      // [N] or nullptr
  void* out;             // [M, N], dtype
  int64_t M, K, Kp, N;
  int dtype;
};
// x [K8] fp32 (K8 = K rounded up to 8, zero padded) -> planes [3, Kp], init [3, 16], xscale.
void int8_activation_avx512(const float* x, int64_t K8, int64_t Kp, int8_t* planes, int32_t* init, float* xscale);
// out[:, n0:n1] for all M rows.
void gemm_int8_rows_avx512(const Int8Args& a, int64_t n0, int64_t n1);
void gemm_int8_rows_avx2(const Int8Args& a, int64_t n0, int64_t n1);
void gemm_int8_rows_scalar(const Int8Args& a, int64_t n0, int64_t n1);

// ---- shared by the entry points ----------------------------------------------------------
// A per-thread buffer of at least `bytes` (64-byte aligned) that lives until the thread
// ends and is reused by the next call with the same slot: no allocation per call.
// kSlotScores: cpu_attention.cpp; kSlotLayer*: cpu_decode_layer.cpp (a layer's intermediate
// vectors, live across its kernel calls, so never a slot the kernels use themselves).
enum ScratchSlot : int { kSlotX = 0, kSlotAcc, kSlotXscale, kSlotXsum, kSlotXq, kSlotXinit, kSlotTiles, kSlotScores,
                         kSlotLayerA, kSlotLayerB, kSlotLayerC, kScratchSlots };
void* thread_scratch(int slot, int64_t bytes);
template <class T>
T* scratch(int slot, int64_t n) {
  return static_cast<T*>(thread_scratch(slot, n * int64_t(sizeof(T))));
}
// Threads for a layer whose weights take `weight_bytes`: 1 below the size where handing
// out work costs more than it saves, else set_cpu_threads' value.
int kernel_threads(int64_t weight_bytes);

// Which body runs. Ordered: a CPU that runs one runs all below it.
// kIsaAmx: AVX-512 at M = 1 (a GEMV cannot fill a tile), AMX tiles at M >= 2.
enum Isa : int { kIsaScalar = 0, kIsaAvx2 = 1, kIsaAvx512 = 2, kIsaAmx = 3 };
Isa detected_isa();  // the best this CPU (and OS) supports
Isa active_isa();
// Makes the best body not above `requested` that this CPU runs active; returns it.
Isa select_isa(Isa requested);
const char* isa_name(Isa isa);  // "amx", "avx512", "avx2", "scalar"
bool parse_isa(const char* name, Isa* isa);  // also "best" (detected_isa())

// Threads for the next calls (bindings.cpp passes at::get_num_threads()); <= 0: all
// usable CPUs. More than usable_cpus() runs usable_cpus().
void set_cpu_threads(int n);

// bf16 <-> fp32. Rounding is to nearest even, as torch's .to(torch.bfloat16); NaN stays NaN.
inline float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

}  // namespace cpu
}  // namespace quant_cuda
