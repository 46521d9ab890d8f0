// The torch-free kernel API of quant_cuda: raw pointers, sizes and an error code.
// bindings.cpp is the only file that sees torch; it turns tensors into these arguments
// and error codes into messages that name the shapes.
//
// Layout (K = in_features, N = out_features, G = groups = ceil(K / group_size)):
//   x       [M, K]    activations, row-major, dtype `dtype`
//   qweight [K/8, N]  int32; the 4-bit code of input row r, output column c is nibble
//                     r % 8 (least-significant first) of qweight[r / 8][c]. When `perm` is
//                     given, qweight rows are already reordered (repacked) so that row r
//                     holds original input row perm[r]; the kernel reads x[:, perm[r]].
//                     CPU, block = W > 0: the same words in column blocks, [N/W][K/8][W]
//                     (qweight[r / 8][c] at ((c / W) * (K/8) + r / 8) * W + c % W), so that
//                     a block's rows are W words apart instead of N (bluelm_quant/column_blocks.py).
//   qzeros  [G, N/8]  int32, v1 zeros: nibble c % 8 of qzeros[g][c / 8] holds zero - 1.
//   scales  [G, N]    same dtype as x.
//   perm    [K]       int32 or nullptr. Row r (after repacking) belongs to group r / group_size.
//   bias    [N]       same dtype as x, or nullptr.
//   out     [M, N]    dtype of x; fully written by the kernel (no pre-zeroing required).
// weight(r, c) = scales[g][c] * (code(r, c) - (stored_zero(g, c) + 1)),  g = r / group_size.
#pragma once
#include <cstdint>

namespace quant_cuda {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

enum Status : int {
  kOk = 0,
  kBadShape = 1,        // K or N not a multiple of 8, M < 1, group_size < 1 ...
  kBadDType = 2,        // dtype not supported by this backend
  kNoKernelForArch = 3, // the build did not include the running GPU's architecture
  kLaunchFailed = 4,    // CUDA launch or runtime error
};

const char* status_message(int status);

// ---- CPU (always built) ------------------------------------------------------------
// dtype: kFloat32 or kBFloat16. On the kernels' thread pool (cpu_threads.h). block: 0 or
// qweight's column block width W (a multiple of 8 dividing N).
int gemm_4bit_cpu(const void* x, const int32_t* qweight, const int32_t* qzeros,
                  const void* scales, const int32_t* perm, const void* bias, void* out,
                  int64_t M, int64_t K, int64_t N, int64_t group_size, int dtype, int64_t block = 0);

// W^T [K, N] (rows in qweight's order) in `dtype`.
int dequantize_4bit_cpu(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                        void* out, int64_t K, int64_t N, int64_t group_size, int dtype);

// y[M, N] = x[M, K] @ (scale[:, None] * weight).T (+ bias): a quantized lm_head.
// weight int8 [N, K] row-major (nn.Linear's layout), one scale per output row; x, scale,
// bias [N] and out [M, N] in `dtype` (kFloat32 or kBFloat16). 1 <= K <= kInt8MaxK.
constexpr int64_t kInt8MaxK = int64_t(1) << 18;  // keeps the AVX-512 int32 lane sums in range
int gemm_int8_cpu(const void* x, const int8_t* weight, const void* scale, const void* bias, void* out,
                  int64_t M, int64_t K, int64_t N, int dtype);

// Reads `bytes` bytes at p (xor of its 64-bit words, so the reads cannot be optimised
// away) on the kernels' thread pool and task hand-out: the read bandwidth the CPU kernels
// can reach, for tools/bench_kernels.py. bytes % 8 == 0.
uint64_t read_probe_cpu(const void* p, int64_t bytes);

// out = qweight [K/8, N] (4-bit codes packed along K) with its code rows permuted: code row
// i of out is code row order[i] of qweight. kBadShape unless K % 8 == 0, N >= 1 and every
// order[i] lies in [0, K) (a permutation is not checked: repeats give repeated rows).
int permute_rows_4bit_cpu(const int32_t* qweight, int32_t* out, const int64_t* order, int64_t K, int64_t N);

// Attention of one query position per head (a decode step), fp32, cpu_attention.cpp:
// q [B, H, D], k and v [B, KVH, T, D] (query head h reads key/value head h / (H / KVH)),
// out [B, H, D] = softmax(scale * q k^T + mask) v. Mask: keep [B, T] (0 = masked) and/or add
// [B, T] (added to the scores), each may be null. A masked position's values are not read.
int decode_attention_cpu(const float* q, const float* k, const float* v, const uint8_t* keep, const float* add,
                         float* out, int64_t B, int64_t H, int64_t KVH, int64_t T, int64_t D, float scale);

// One decode position through the two halves of a LLaMA-like decoder layer that lie around
// the KV cache (cpu_decode_layer.cpp), fp32, B rows of hidden size H; every Linear a 4-bit
// layer in the kernel layout (gemm_4bit_cpu's arguments).
struct Linear4bit {
  const int32_t* qweight;
  const int32_t* qzeros;
  const float* scales;
  const int32_t* perm;  // act-order gather or null
  const float* bias;    // or null
  int64_t K, N, group_size;
  int64_t block;  // qweight's column block width, 0: [K/8, N]
};
// q [B, heads, D], k and v [B, kv_heads, D] = RoPE'd projections of rms_norm(x) (q and k
// rotated, rotate-half convention; cos and sin [B or 1, D], cos_rows 1 or B); qkv.N =
// (heads + 2 kv_heads) D, in that order.
int decode_qkv_cpu(const float* x, const float* norm_weight, float eps, const Linear4bit& qkv, const float* cos,
                   const float* sin, int64_t cos_rows, float* q, float* k, float* v, int64_t B, int64_t H,
                   int64_t heads, int64_t kv_heads, int64_t D);
// out [B, H] = h + down(silu(gate) * up), where h = x + o(attn) and [gate | up] =
// gate_up(rms_norm(h)): the rest of the layer after attention.
int decode_o_mlp_cpu(const float* x, const float* attn, const Linear4bit& o, const float* norm_weight, float eps,
                     const Linear4bit& gate_up, const Linear4bit& down, float* out, int64_t B, int64_t H);

// ---- CUDA (built when the CUDA toolkit and a CUDA torch are present) ---------------
// dtype: kFloat16 or kBFloat16. `stream` is a cudaStream_t passed as void*.
int gemm_4bit_cuda(const void* x, const int32_t* qweight, const int32_t* qzeros,
                   const void* scales, const int32_t* perm, const void* bias, void* out,
                   int64_t M, int64_t K, int64_t N, int64_t group_size, int dtype,
                   void* stream);

int dequantize_4bit_cuda(const int32_t* qweight, const int32_t* qzeros, const void* scales,
                         void* out, int64_t K, int64_t N, int64_t group_size, int dtype,
                         void* stream);

}  // namespace quant_cuda
