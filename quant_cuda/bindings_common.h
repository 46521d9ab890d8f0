// What the torch binding files (bindings.cpp, bindings_decode.cpp) share: argument checks
// with messages that name shapes, dtypes and devices, and the kernels' thread setting.
// Defined in bindings.cpp.
#pragma once
#include <ATen/core/Tensor.h>

#include <string>

namespace quant_cuda {
namespace bindings {

int kernel_dtype(at::ScalarType t);  // kFloat32 / kFloat16 / kBFloat16, or -1

struct Layer {
  int64_t K, N, G;
  int64_t block;  // 0: qweight [K/8, N]; else its width W: qweight [N/W, K/8, W] (column blocks, CPU only)
};
// qweight [K/8, N] (or in column blocks [N/W, K/8, W], kernels.h), qzeros [G, N/8],
// scales [G, N], G = ceil(K / group_size), one device; fails with a message naming `op`
// otherwise.
Layer check_layer(const char* op, const at::Tensor& qweight, const at::Tensor& qzeros, const at::Tensor& scales,
                  int64_t group_size);

// Fails with the kernels' status message and `call` (what was passed).
[[noreturn]] void fail_status(const char* op, int status, const at::Device& device, const std::string& call);

// Hands the kernels their thread count (set_kernel_threads, or torch's) before a call.
void use_torch_threads();

}  // namespace bindings
}  // namespace quant_cuda
