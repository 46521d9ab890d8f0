// Torch bindings of quant_cuda: with bindings_decode.cpp, the only files that include torch. It registers the ops
// under the `bluelm_quant` namespace (TORCH_LIBRARY), checks every tensor at the
// boundary with messages that name shapes, dtypes and devices, allocates the output,
// and calls the torch-free kernels of kernels.h. Fake (meta) implementations for
// torch.compile live in bluelm_quant/ops.py (torch.library.register_fake), which
// set_python_module below points torch at.
//
// Non-contiguous inputs are accepted and copied to contiguous tensors first (the kernels
// take raw row-major pointers); callers that care about the copy pass contiguous tensors.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <optional>
#include <string>

#ifdef QUANT_CUDA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#endif

#include "bindings_common.h"
#include "cpu_kernels.h"
#include "kernels.h"

// TORCH_CUDA_ARCH_LIST of the build, comma-separated (set by build_ext_config.py).
#define QC_STR2(...) #__VA_ARGS__
#define QC_STR(...) QC_STR2(__VA_ARGS__)
#ifdef QUANT_CUDA_ARCHS
static const char* kBuiltArchs = QC_STR(QUANT_CUDA_ARCHS);
#else
static const char* kBuiltArchs = "";
#endif

// The checks and settings bindings_decode.cpp shares (bindings_common.h).
namespace quant_cuda {
namespace bindings {

using at::Tensor;

int kernel_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kHalf: return kFloat16;
    case at::kBFloat16: return kBFloat16;
    default: return -1;
  }
}

bool device_supports(const at::Device& d, at::ScalarType t) {
  if (d.is_cpu()) return t == at::kFloat || t == at::kBFloat16;
#ifdef QUANT_CUDA_WITH_CUDA
  if (d.is_cuda()) return t == at::kHalf || t == at::kBFloat16;
#endif
  return false;
}

const char* supported_dtypes(const at::Device& d) {
  return d.is_cuda() ? "float16 or bfloat16 (ops.gemm converts float32 to float16 on CUDA)"
                     : "float32 or bfloat16";
}

// qweight [K/8, N] or [N/W, K/8, W], qzeros [G, N/8], scales [G, N], G = ceil(K / group_size), one device.
Layer check_layer(const char* op, const Tensor& qweight, const Tensor& qzeros, const Tensor& scales,
                  int64_t group_size) {
  TORCH_CHECK((qweight.dim() == 2 || qweight.dim() == 3) && qweight.scalar_type() == at::kInt, op,
              ": qweight must be an int32 tensor [K/8, N] (or in column blocks [N/W, K/8, W]), got ",
              qweight.scalar_type(), " of shape ", qweight.sizes());
  TORCH_CHECK(qzeros.dim() == 2 && qzeros.scalar_type() == at::kInt, op,
              ": qzeros must be a 2-D int32 tensor [G, N/8], got ", qzeros.scalar_type(), " of shape ",
              qzeros.sizes());
  const bool blocked = qweight.dim() == 3;
  const int64_t K = qweight.size(blocked ? 1 : 0) * 8, block = blocked ? qweight.size(2) : 0;
  const int64_t N = blocked ? qweight.size(0) * block : qweight.size(1);
  TORCH_CHECK(K > 0 && N > 0 && N % 8 == 0 && block % 8 == 0, op,
              ": N must be a positive multiple of 8 (and a column block W too), got qweight ", qweight.sizes());
  TORCH_CHECK(!blocked || qweight.device().is_cpu(), op, ": qweight in column blocks ", qweight.sizes(),
              " is a CPU kernel layout, got it on ", qweight.device());
  TORCH_CHECK(group_size >= 8 && group_size % 8 == 0, op, ": group_size=", group_size,
              " must be a positive multiple of 8 (pass K=", K, " for one group per column)");
  const int64_t G = (K + group_size - 1) / group_size;
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == G && scales.size(1) == N, op, ": scales ", scales.sizes(),
              " must be [G, N] = [", G, ", ", N, "] for qweight ", qweight.sizes(), " (K=", K,
              ") and group_size=", group_size);
  TORCH_CHECK(qzeros.size(0) == G && qzeros.size(1) == N / 8, op, ": qzeros ", qzeros.sizes(),
              " must be [G, N/8] = [", G, ", ", N / 8, "] for qweight ", qweight.sizes(),
              " and group_size=", group_size);
  TORCH_CHECK(qzeros.device() == qweight.device() && scales.device() == qweight.device(), op,
              ": qweight, qzeros and scales must be on one device, got ", qweight.device(), ", ",
              qzeros.device(), ", ", scales.device());
  return {K, N, G, block};
}

[[noreturn]] void fail_status(const char* op, int status, const at::Device& device, const std::string& call) {
#ifdef QUANT_CUDA_WITH_CUDA
  if (status == kNoKernelForArch) {
    int major = 0, minor = 0;
    cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index());
    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index());
    TORCH_CHECK(false, op, ": ", status_message(status), " (", device, " is sm_", major, minor,
                "); quant_cuda was built with TORCH_CUDA_ARCH_LIST=\"", kBuiltArchs,
                "\". Rebuild it with TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
                "\" (or a list that contains it): pip install --no-build-isolation -e .");
  }
#endif
  TORCH_CHECK(false, op, ": ", status_message(status), " [status ", status, "] for ", call);
}

// The kernels use torch's thread setting (torch.set_num_threads) unless a count of their own
// is set (bluelm_quant.ops.set_kernel_threads: the decode loop runs torch's small ops on one
// thread, whose 2-thread OpenMP regions stall on a loaded machine, and the kernels on more).
// cpu_kernels.cpp caps it at the CPUs this process may run on (ops.gemm says so once).
std::atomic<int> g_kernel_threads{0};  // 0: follow torch
void use_torch_threads() {
  const int own = g_kernel_threads.load(std::memory_order_relaxed);
  cpu::set_cpu_threads(own > 0 ? own : at::get_num_threads());
}

}  // namespace bindings
}  // namespace quant_cuda

namespace {

using at::Tensor;
using namespace quant_cuda;
using namespace quant_cuda::bindings;

#ifdef QUANT_CUDA_WITH_CUDA
void* current_stream(const at::Device& d) {
  return static_cast<void*>(c10::cuda::getCurrentCUDAStream(d.index()).stream());
}
#endif

Tensor gemm_4bit(const Tensor& x_in, const Tensor& qweight_in, const Tensor& qzeros_in, const Tensor& scales_in,
                 const std::optional<Tensor>& perm_in, int64_t group_size, const std::optional<Tensor>& bias_in) {
  const char* op = "bluelm_quant::gemm_4bit";
  const Layer L = check_layer(op, qweight_in, qzeros_in, scales_in, group_size);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x_in.sizes(),
              " (bluelm_quant.ops.gemm flattens [..., K])");
  TORCH_CHECK(x_in.size(1) == L.K, op, ": x has K=", x_in.size(1), " (shape ", x_in.sizes(),
              ") but qweight ", qweight_in.sizes(), " holds K=", L.K, " input features");
  const at::Device dev = x_in.device();
  TORCH_CHECK(qweight_in.device() == dev, op, ": x is on ", dev, " but the quantized weights are on ",
              qweight_in.device());
  TORCH_CHECK(device_supports(dev, x_in.scalar_type()), op, ": x on ", dev, " must be ", supported_dtypes(dev),
              ", got ", x_in.scalar_type());
  TORCH_CHECK(scales_in.scalar_type() == x_in.scalar_type(), op, ": scales must have x's dtype ",
              x_in.scalar_type(), ", got ", scales_in.scalar_type());
  if (perm_in) {
    TORCH_CHECK(perm_in->dim() == 1 && perm_in->size(0) == L.K && perm_in->scalar_type() == at::kInt, op,
                ": perm must be int32 [K] = [", L.K, "], got ", perm_in->scalar_type(), " of shape ",
                perm_in->sizes());
    TORCH_CHECK(perm_in->device() == dev, op, ": perm is on ", perm_in->device(), ", x on ", dev);
  }
  if (bias_in) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == L.N, op, ": bias must be [N] = [", L.N,
                "], got shape ", bias_in->sizes());
    TORCH_CHECK(bias_in->scalar_type() == x_in.scalar_type() && bias_in->device() == dev, op,
                ": bias must be ", x_in.scalar_type(), " on ", dev, ", got ", bias_in->scalar_type(), " on ",
                bias_in->device());
  }

  const int64_t M = x_in.size(0);
  Tensor out = at::empty({M, L.N}, x_in.options());
  if (M == 0) return out;
  const Tensor x = x_in.contiguous(), qweight = qweight_in.contiguous(), qzeros = qzeros_in.contiguous(),
               scales = scales_in.contiguous();
  const Tensor perm = perm_in ? perm_in->contiguous() : Tensor();
  const Tensor bias = bias_in ? bias_in->contiguous() : Tensor();
  const int32_t* perm_ptr = perm.defined() ? perm.data_ptr<int32_t>() : nullptr;
  const void* bias_ptr = bias.defined() ? bias.data_ptr() : nullptr;
  const int dtype = kernel_dtype(x.scalar_type());

  int status = kBadDType;
  if (dev.is_cpu()) {
    if (perm_ptr) {  // the kernel gathers x[:, perm[r]]: an out-of-range entry would read out of bounds
      for (int64_t r = 0; r < L.K; ++r)
        TORCH_CHECK(perm_ptr[r] >= 0 && perm_ptr[r] < L.K, op, ": perm[", r, "]=", perm_ptr[r],
                    " is not an input row index in [0, ", L.K, ")");
    }
    use_torch_threads();
    status = gemm_4bit_cpu(x.data_ptr(), qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr(),
                           perm_ptr, bias_ptr, out.data_ptr(), M, L.K, L.N, group_size, dtype, L.block);
  }
#ifdef QUANT_CUDA_WITH_CUDA
  else if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    status = gemm_4bit_cuda(x.data_ptr(), qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr(),
                            perm_ptr, bias_ptr, out.data_ptr(), M, L.K, L.N, group_size, dtype, current_stream(dev));
  }
#endif
  if (status != kOk)
    fail_status(op, status, dev,
                c10::str("x ", x.scalar_type(), x.sizes(), ", qweight ", qweight.sizes(), ", scales ", scales.sizes(),
                         ", group_size ", group_size, " on ", dev));
  return out;
}

Tensor dequantize_4bit(const Tensor& qweight_in, const Tensor& qzeros_in, const Tensor& scales_in, int64_t group_size,
                       std::optional<at::ScalarType> dtype_opt) {
  const char* op = "bluelm_quant::dequantize_4bit";
  const Layer L = check_layer(op, qweight_in, qzeros_in, scales_in, group_size);
  TORCH_CHECK(L.block == 0, op, ": qweight must be [K/8, N], got column blocks ", qweight_in.sizes(),
              " (bluelm_quant.qlayer.QLayer.column_qweight gives the plain layout)");
  const at::Device dev = qweight_in.device();
  const at::ScalarType dtype = dtype_opt.value_or(scales_in.scalar_type());
  TORCH_CHECK(device_supports(dev, dtype), op, ": output dtype on ", dev, " must be ", supported_dtypes(dev), ", got ",
              dtype);
  const Tensor qweight = qweight_in.contiguous(), qzeros = qzeros_in.contiguous();
  const Tensor scales = scales_in.to(dtype).contiguous();  // the kernel reads scales in the output dtype
  Tensor out = at::empty({L.K, L.N}, scales.options());
  int status = kBadDType;
  if (dev.is_cpu()) {
    use_torch_threads();
    status = dequantize_4bit_cpu(qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr(),
                                 out.data_ptr(), L.K, L.N, group_size, kernel_dtype(dtype));
  }
#ifdef QUANT_CUDA_WITH_CUDA
  else if (dev.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dev);
    status = dequantize_4bit_cuda(qweight.data_ptr<int32_t>(), qzeros.data_ptr<int32_t>(), scales.data_ptr(),
                                  out.data_ptr(), L.K, L.N, group_size, kernel_dtype(dtype), current_stream(dev));
  }
#endif
  if (status != kOk)
    fail_status(op, status, dev,
                c10::str("qweight ", qweight.sizes(), ", scales ", scales.sizes(), ", group_size ", group_size,
                         ", dtype ", dtype, " on ", dev));
  return out;
}

// y = x @ (scale[:, None] * weight).T (+ bias), weight int8 [N, K]: the quantized lm_head.
Tensor gemm_int8(const Tensor& x_in, const Tensor& weight_in, const Tensor& scale_in,
                 const std::optional<Tensor>& bias_in) {
  const char* op = "bluelm_quant::gemm_int8";
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D [M, K], got shape ", x_in.sizes(),
              " (bluelm_quant.ops.gemm_int8 flattens [..., K])");
  TORCH_CHECK(weight_in.dim() == 2 && weight_in.scalar_type() == at::kChar, op,
              ": weight must be a 2-D int8 tensor [N, K], got ", weight_in.scalar_type(), " of shape ",
              weight_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = weight_in.size(0);
  TORCH_CHECK(weight_in.size(1) == K, op, ": x has K=", K, " (shape ", x_in.sizes(), ") but weight ",
              weight_in.sizes(), " holds K=", weight_in.size(1), " input features");
  TORCH_CHECK(K >= 1 && K <= kInt8MaxK, op, ": K=", K, " must lie in [1, ", kInt8MaxK, "] for the int8 kernel");
  const at::Device dev = x_in.device();
  TORCH_CHECK(dev.is_cpu() && weight_in.device() == dev && scale_in.device() == dev, op,
              ": the int8 kernel runs on the CPU; got x on ", dev, ", weight on ", weight_in.device(), ", scale on ",
              scale_in.device());
  TORCH_CHECK(x_in.scalar_type() == at::kFloat || x_in.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x_in.scalar_type());
  TORCH_CHECK(scale_in.dim() == 1 && scale_in.size(0) == N && scale_in.scalar_type() == x_in.scalar_type(), op,
              ": scale must be ", x_in.scalar_type(), " [N] = [", N, "], got ", scale_in.scalar_type(), " of shape ",
              scale_in.sizes());
  if (bias_in) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N && bias_in->scalar_type() == x_in.scalar_type() &&
                    bias_in->device() == dev,
                op, ": bias must be ", x_in.scalar_type(), " [N] = [", N, "] on ", dev, ", got ",
                bias_in->scalar_type(), " of shape ", bias_in->sizes(), " on ", bias_in->device());
  }
  Tensor out = at::empty({M, N}, x_in.options());
  if (M == 0 || N == 0) return out;
  const Tensor x = x_in.contiguous(), weight = weight_in.contiguous(), scale = scale_in.contiguous();
  const Tensor bias = bias_in ? bias_in->contiguous() : Tensor();
  use_torch_threads();
  const int status = gemm_int8_cpu(x.data_ptr(), weight.data_ptr<int8_t>(), scale.data_ptr(),
                                   bias.defined() ? bias.data_ptr() : nullptr, out.data_ptr(), M, K, N,
                                   kernel_dtype(x.scalar_type()));
  if (status != kOk)
    fail_status(op, status, dev, c10::str("x ", x.scalar_type(), x.sizes(), ", weight ", weight.sizes()));
  return out;
}

// Read-bandwidth probe for tools/bench_kernels.py (kernels.h read_probe_cpu).
int64_t read_probe(const Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.nbytes() % 8 == 0,
              "bluelm_quant::read_probe: x must be a contiguous CPU tensor of a multiple of 8 bytes, got ",
              x.device(), " ", x.sizes(), x.is_contiguous() ? "" : " (not contiguous)");
  use_torch_threads();
  return int64_t(read_probe_cpu(x.data_ptr(), int64_t(x.nbytes())) & 0x7FFFFFFFFFFFFFFFull);
}

// Act-order repack (kernels.h permute_rows_4bit_cpu). CPU only: on CUDA torch's gather is fast.
Tensor permute_rows_4bit(const Tensor& qweight, const Tensor& order) {
  TORCH_CHECK(qweight.device().is_cpu() && order.device().is_cpu(),
              "bluelm_quant::permute_rows_4bit: CPU tensors only, got ", qweight.device(), " and ", order.device());
  TORCH_CHECK(qweight.scalar_type() == at::kInt && qweight.dim() == 2,
              "bluelm_quant::permute_rows_4bit: qweight must be int32 [K/8, N], got ", qweight.scalar_type(), " ",
              qweight.sizes());
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.size(0) == qweight.size(0) * 8,
              "bluelm_quant::permute_rows_4bit: order must be int64 [", qweight.size(0) * 8, "], got ",
              order.scalar_type(), " ", order.sizes());
  const Tensor q = qweight.contiguous(), o = order.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  use_torch_threads();
  const int status = permute_rows_4bit_cpu(q.data_ptr<int32_t>(), out.data_ptr<int32_t>(), o.data_ptr<int64_t>(),
                                           o.size(0), q.size(1));
  TORCH_CHECK(status == kOk, "bluelm_quant::permute_rows_4bit: ", status_message(status),
              " (order must hold row indices in [0, ", o.size(0), "))");
  return out;
}

// Single-position decode attention (kernels.h decode_attention_cpu), fp32 on the CPU.
Tensor decode_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const std::optional<Tensor>& mask_in,
                        double scale) {
  const char* op = "bluelm_quant::decode_attention";
  TORCH_CHECK(q_in.dim() == 3 && k_in.dim() == 4 && v_in.dim() == 4, op,
              ": q must be [B, H, D] and k, v [B, KVH, T, D], got q ", q_in.sizes(), ", k ", k_in.sizes(), ", v ",
              v_in.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), D = q_in.size(2), KVH = k_in.size(1), T = k_in.size(2);
  TORCH_CHECK(k_in.sizes() == v_in.sizes() && k_in.size(0) == B && k_in.size(3) == D && KVH >= 1 && H % KVH == 0,
              op, ": shapes do not fit: q ", q_in.sizes(), " (B, H, D), k ", k_in.sizes(), " and v ", v_in.sizes(),
              " (B, KVH, T, D, with H a multiple of KVH)");
  for (const Tensor* t : {&q_in, &k_in, &v_in})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, op, ": q, k and v must be float32 CPU tensors, got ",
                t->scalar_type(), " on ", t->device());
  Tensor keep, add;
  if (mask_in) {
    TORCH_CHECK(mask_in->device().is_cpu() && mask_in->dim() == 2 && mask_in->size(0) == B && mask_in->size(1) == T &&
                    (mask_in->scalar_type() == at::kBool || mask_in->scalar_type() == at::kFloat),
                op, ": mask must be a bool (true = attend) or float32 (added) CPU tensor [B, T] = [", B, ", ", T,
                "], got ", mask_in->scalar_type(), " ", mask_in->sizes(), " on ", mask_in->device());
    (mask_in->scalar_type() == at::kBool ? keep : add) = mask_in->contiguous();
  }
  const Tensor q = q_in.contiguous(), k = k_in.contiguous(), v = v_in.contiguous();
  Tensor out = at::empty({B, H, D}, q.options());
  if (B == 0 || H == 0 || D == 0) return out;
  const int status = decode_attention_cpu(
      q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
      keep.defined() ? reinterpret_cast<const uint8_t*>(keep.data_ptr<bool>()) : nullptr,
      add.defined() ? add.data_ptr<float>() : nullptr, out.data_ptr<float>(), B, H, KVH, T, D, float(scale));
  TORCH_CHECK(status == kOk, op, ": ", status_message(status), " (q ", q.sizes(), ", k ", k.sizes(), ")");
  return out;
}

}  // namespace

TORCH_LIBRARY(bluelm_quant, m) {
  m.set_python_module("bluelm_quant.ops");
  // y[M, N] = x[M, K] @ W^T (+ bias); layout in kernels.h. perm: act-order row gather.
  // qweight [K/8, N], or on the CPU in column blocks [N/W, K/8, W].
  m.def("gemm_4bit(Tensor x, Tensor qweight, Tensor qzeros, Tensor scales, Tensor? perm, int group_size, "
        "Tensor? bias) -> Tensor");
  // W^T [K, N] (rows in qweight's order) in dtype (default: scales' dtype).
  m.def("dequantize_4bit(Tensor qweight, Tensor qzeros, Tensor scales, int group_size, ScalarType? dtype=None) "
        "-> Tensor");
  // y[M, N] = x[M, K] @ (scale[:, None] * weight).T (+ bias); weight int8 [N, K], scale [N]. CPU only.
  m.def("gemm_int8(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
  // Reads all of x on the kernels' thread pool (for benchmarks: the bandwidth they can reach). CPU only.
  m.def("read_probe(Tensor x) -> int");
  // qweight [K/8, N] with code row i taken from code row order[i] (act-order repack). CPU only.
  m.def("permute_rows_4bit(Tensor qweight, Tensor order) -> Tensor");
  // softmax(scale * q k^T + mask) v for one query position per head (cpu_attention.py).
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(bluelm_quant, CPU, m) {
  m.impl("gemm_4bit", &gemm_4bit);
  m.impl("dequantize_4bit", &dequantize_4bit);
  m.impl("gemm_int8", &gemm_int8);
  m.impl("read_probe", &read_probe);
  m.impl("permute_rows_4bit", &permute_rows_4bit);
  m.impl("decode_attention", &decode_attention);
}

#ifdef QUANT_CUDA_WITH_CUDA
TORCH_LIBRARY_IMPL(bluelm_quant, CUDA, m) {
  m.impl("gemm_4bit", &gemm_4bit);
  m.impl("dequantize_4bit", &dequantize_4bit);
}
#endif

// A plain Python module (no pybind11): importing it runs the registrations above. Its
// attributes say what was built, for bluelm_quant.ops.backend(); its two functions choose
// the CPU body (bluelm_quant.ops.set_cpu_isa wraps them).
namespace {
PyObject* py_get_cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(quant_cuda::cpu::isa_name(quant_cuda::cpu::active_isa()));
}

PyObject* py_set_cpu_isa(PyObject*, PyObject* arg) {
  const char* name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : nullptr;
  quant_cuda::cpu::Isa isa;
  if (!name || !quant_cuda::cpu::parse_isa(name, &isa)) {
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "unknown CPU kernel path %R: use 'amx', 'avx512', 'avx2', 'scalar' or 'best'",
                 arg);
    return nullptr;
  }
  return PyUnicode_FromString(quant_cuda::cpu::isa_name(quant_cuda::cpu::select_isa(isa)));
}

PyObject* py_set_kernel_threads(PyObject*, PyObject* arg) {
  const long n = PyLong_AsLong(arg);
  if (n == -1 && PyErr_Occurred()) return nullptr;
  if (n < 0) {
    PyErr_Format(PyExc_ValueError, "set_kernel_threads(%ld): use a positive count, or 0 to follow torch", n);
    return nullptr;
  }
  g_kernel_threads.store(int(n), std::memory_order_relaxed);
  Py_RETURN_NONE;
}

PyObject* py_get_kernel_threads(PyObject*, PyObject*) { return PyLong_FromLong(g_kernel_threads.load()); }

PyMethodDef kMethods[] = {
    {"set_kernel_threads", py_set_kernel_threads, METH_O,
     "set_kernel_threads(n) -> None: the CPU kernels run n threads (capped at the usable CPUs); 0: torch's count"},
    {"get_kernel_threads", py_get_kernel_threads, METH_NOARGS,
     "get_kernel_threads() -> the count set_kernel_threads gave (0: the kernels follow torch.get_num_threads())"},
    {"get_cpu_isa", py_get_cpu_isa, METH_NOARGS,
     "get_cpu_isa() -> the CPU body in use: 'amx', 'avx512', 'avx2' or 'scalar'"},
    {"set_cpu_isa", py_set_cpu_isa, METH_O,
     "set_cpu_isa(name) -> the body now in use: the best one not above `name` ('amx', 'avx512', 'avx2', 'scalar'; "
     "'best') that this CPU runs"},
    {nullptr, nullptr, 0, nullptr},
};
}  // namespace

extern "C" PyMODINIT_FUNC PyInit_quant_cuda(void) {
  static PyModuleDef def = {PyModuleDef_HEAD_INIT, "quant_cuda",
                            "bluelm-quant 4-bit kernels; the ops are torch.ops.bluelm_quant.*", -1, kMethods};
  PyObject* mod = PyModule_Create(&def);
  if (!mod) return nullptr;
#ifdef QUANT_CUDA_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
  if (PyModule_AddObject(mod, "with_cuda", PyBool_FromLong(with_cuda)) < 0 ||
      PyModule_AddStringConstant(mod, "cuda_archs", kBuiltArchs) < 0 ||
      PyModule_AddStringConstant(mod, "cpu_isa_detected", cpu::isa_name(cpu::detected_isa())) < 0) {
    Py_DECREF(mod);
    return nullptr;
  }
  return mod;
}
