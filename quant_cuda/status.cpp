// Messages for the kernel API's status codes (kernels.h). bindings.cpp adds the
// shapes, dtypes and devices of the failing call; these say what the code means.
#include "kernels.h"

namespace quant_cuda {

const char* status_message(int status) {
  switch (status) {
    case kOk:
      return "ok";
    case kBadShape:
      return "bad shape: K and N must be multiples of 8, M >= 1, group_size a positive "
             "multiple of 8, scales/qzeros must have ceil(K / group_size) rows";
    case kBadDType:
      return "dtype not supported by this kernel (CPU: float32/bfloat16; CUDA: float16/bfloat16)";
    case kNoKernelForArch:
      return "quant_cuda was not compiled for this GPU's architecture";
    case kLaunchFailed:
      return "CUDA kernel launch or runtime error";
    default:
      return "unknown quant_cuda status code";
  }
}

}  // namespace quant_cuda
