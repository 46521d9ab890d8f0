// Torch bindings of the decoder-layer ops (kernels.h decode_qkv_cpu, decode_o_mlp_cpu;
// bluelm_quant/cpu_decode.py calls them): checks at the boundary, outputs allocated here.
// fp32 on the CPU only. A 4-bit Linear arrives as [qweight, qzeros, scales, perm, bias]
// (perm and bias may be None) and its group size, as gemm_4bit takes them.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "bindings_common.h"
#include "kernels.h"

namespace {

using at::Tensor;
using namespace quant_cuda;
using namespace quant_cuda::bindings;
using LinearList = c10::List<std::optional<Tensor>>;

void check_fp32_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// The contiguous tensors behind a Linear4bit, kept alive for the call.
struct Linear {
  std::vector<Tensor> hold;
  Linear4bit args;
};

Linear linear(const char* op, const char* name, const LinearList& list, int64_t group_size) {
  TORCH_CHECK(list.size() == 5, op, ": ", name, " must be [qweight, qzeros, scales, perm or None, bias or None], got ",
              list.size(), " entries");
  const std::optional<Tensor> qw = list.get(0), qz = list.get(1), sc = list.get(2), perm = list.get(3),
                              bias = list.get(4);
  TORCH_CHECK(qw && qz && sc, op, ": ", name, ": qweight, qzeros and scales must be tensors");
  const std::string where = c10::str(op, " (", name, ")");  // which of the op's Linears a message is about
  const Layer L = check_layer(where.c_str(), *qw, *qz, *sc, group_size);
  TORCH_CHECK(qw->device().is_cpu(), where, ": must be on the CPU, got ", qw->device());
  check_fp32_cpu(where.c_str(), "scales", *sc);
  Linear out;
  out.hold = {qw->contiguous(), qz->contiguous(), sc->contiguous()};
  const int32_t* perm_ptr = nullptr;
  if (perm) {
    TORCH_CHECK(perm->dim() == 1 && perm->size(0) == L.K && perm->scalar_type() == at::kInt && perm->device().is_cpu(),
                op, ": ", name, " perm must be int32 [K] = [", L.K, "] on the CPU, got ", perm->scalar_type(), " ",
                perm->sizes(), " on ", perm->device());
    out.hold.push_back(perm->contiguous());
    perm_ptr = out.hold.back().data_ptr<int32_t>();
    for (int64_t r = 0; r < L.K; ++r)  // the kernel gathers x[:, perm[r]]
      TORCH_CHECK(perm_ptr[r] >= 0 && perm_ptr[r] < L.K, op, ": ", name, " perm[", r, "]=", perm_ptr[r],
                  " is not an input row index in [0, ", L.K, ")");
  }
  const float* bias_ptr = nullptr;
  if (bias) {
    check_fp32_cpu(where.c_str(), "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == L.N, op, ": ", name, " bias must be [N] = [", L.N, "], got ",
                bias->sizes());
    out.hold.push_back(bias->contiguous());
    bias_ptr = out.hold.back().data_ptr<float>();
  }
  out.args = {out.hold[0].data_ptr<int32_t>(), out.hold[1].data_ptr<int32_t>(), out.hold[2].data_ptr<float>(),
              perm_ptr, bias_ptr, L.K, L.N, group_size, L.block};
  return out;
}

// x [B, H] (fp32) and a norm weight [H].
void check_hidden(const char* op, const Tensor& x, const Tensor& norm_weight) {
  check_fp32_cpu(op, "x", x);
  check_fp32_cpu(op, "norm_weight", norm_weight);
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) >= 1, op, ": x must be [B, H], got ", x.sizes());
  TORCH_CHECK(norm_weight.dim() == 1 && norm_weight.size(0) == x.size(1), op, ": norm_weight must be [H] = [",
              x.size(1), "], got ", norm_weight.sizes());
}

std::tuple<Tensor, Tensor, Tensor> decode_qkv(const Tensor& x_in, const Tensor& norm_in, double eps,
                                              const LinearList& qkv_in, int64_t group_size, const Tensor& cos_in,
                                              const Tensor& sin_in, int64_t heads, int64_t kv_heads) {
  const char* op = "bluelm_quant::decode_qkv";
  check_hidden(op, x_in, norm_in);
  check_fp32_cpu(op, "cos", cos_in);
  check_fp32_cpu(op, "sin", sin_in);
  const int64_t B = x_in.size(0), H = x_in.size(1);
  TORCH_CHECK(cos_in.dim() == 3 && cos_in.sizes() == sin_in.sizes() && cos_in.size(1) == 1 &&
                  (cos_in.size(0) == 1 || cos_in.size(0) == B) && cos_in.size(2) >= 2 && cos_in.size(2) % 2 == 0,
              op, ": cos and sin must be one row of head_dim (even) values per batch entry or one for all, [B or 1, 1, D], "
              "got cos ", cos_in.sizes(), ", sin ", sin_in.sizes(), " for B=", B);
  const int64_t D = cos_in.size(2), rows = cos_in.size(0);
  TORCH_CHECK(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, op, ": heads=", heads, " must be a multiple of kv_heads=",
              kv_heads);
  const Linear qkv = linear(op, "qkv", qkv_in, group_size);
  TORCH_CHECK(qkv.args.K == H && qkv.args.N == (heads + 2 * kv_heads) * D, op, ": qkv ", qkv.hold[0].sizes(),
              " must map H=", H, " to (heads + 2 kv_heads) * head_dim = ", (heads + 2 * kv_heads) * D, " outputs");
  const Tensor x = x_in.contiguous(), norm = norm_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  Tensor q = at::empty({B, heads, D}, x.options()), k = at::empty({B, kv_heads, D}, x.options()),
         v = at::empty({B, kv_heads, D}, x.options());
  use_torch_threads();
  const int status = decode_qkv_cpu(x.data_ptr<float>(), norm.data_ptr<float>(), float(eps), qkv.args,
                                    cos.data_ptr<float>(), sin.data_ptr<float>(), rows, q.data_ptr<float>(),
                                    k.data_ptr<float>(), v.data_ptr<float>(), B, H, heads, kv_heads, D);
  if (status != kOk) fail_status(op, status, x.device(), c10::str("x ", x.sizes(), ", qkv ", qkv.hold[0].sizes()));
  return {q, k, v};
}

Tensor decode_o_mlp(const Tensor& x_in, const Tensor& attn_in, const LinearList& o_in, int64_t o_group_size,
                    const Tensor& norm_in, double eps, const LinearList& gate_up_in, int64_t gate_up_group_size,
                    const LinearList& down_in, int64_t down_group_size) {
  const char* op = "bluelm_quant::decode_o_mlp";
  check_hidden(op, x_in, norm_in);
  check_fp32_cpu(op, "attn", attn_in);
  const int64_t B = x_in.size(0), H = x_in.size(1);
  const Linear o = linear(op, "o", o_in, o_group_size), gate_up = linear(op, "gate_up", gate_up_in, gate_up_group_size),
               down = linear(op, "down", down_in, down_group_size);
  TORCH_CHECK(attn_in.dim() == 2 && attn_in.size(0) == B && attn_in.size(1) == o.args.K, op, ": attn must be [B, K of o] = [",
              B, ", ", o.args.K, "], got ", attn_in.sizes());
  TORCH_CHECK(o.args.N == H && gate_up.args.K == H && down.args.N == H && gate_up.args.N == 2 * down.args.K, op,
              ": shapes do not chain: x [B, H=", H, "], o ", o.hold[0].sizes(), ", gate_up ", gate_up.hold[0].sizes(),
              ", down ", down.hold[0].sizes(), " (o: -> H, gate_up: H -> 2 I, down: I -> H)");
  const Tensor x = x_in.contiguous(), attn = attn_in.contiguous(), norm = norm_in.contiguous();
  Tensor out = at::empty({B, H}, x.options());
  use_torch_threads();
  const int status = decode_o_mlp_cpu(x.data_ptr<float>(), attn.data_ptr<float>(), o.args, norm.data_ptr<float>(),
                                      float(eps), gate_up.args, down.args, out.data_ptr<float>(), B, H);
  if (status != kOk) fail_status(op, status, x.device(), c10::str("x ", x.sizes(), ", attn ", attn.sizes()));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bluelm_quant, m) {
  // RMSNorm, the fused q/k/v projection and RoPE of one decode position: (q [B, heads, D],
  // k [B, kv_heads, D], v [B, kv_heads, D]).
  m.def("decode_qkv(Tensor x, Tensor norm_weight, float eps, Tensor?[] qkv, int group_size, Tensor cos, "
        "Tensor sin, int heads, int kv_heads) -> (Tensor, Tensor, Tensor)");
  // The layer after attention: x + o(attn) -> + down(silu(gate) * up) of its RMSNorm. [B, H].
  m.def("decode_o_mlp(Tensor x, Tensor attn, Tensor?[] o, int o_group_size, Tensor norm_weight, float eps, "
        "Tensor?[] gate_up, int gate_up_group_size, Tensor?[] down, int down_group_size) -> Tensor");
}

TORCH_LIBRARY_IMPL(bluelm_quant, CPU, m) {
  m.impl("decode_qkv", &decode_qkv);
  m.impl("decode_o_mlp", &decode_o_mlp);
}
