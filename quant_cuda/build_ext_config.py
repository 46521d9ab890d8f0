"""How the `quant_cuda` extension is built; shared by setup.py and quant_cuda/setup_cuda.py.

Both load this file by path (importlib.util.spec_from_file_location): once the compiled `quant_cuda` module
exists, `import quant_cuda.build_ext_config` resolves `quant_cuda` to the .so and fails.

Kind of build (printed at build time):
  cuda  CUDA + CPU kernels: torch is a CUDA build (torch.version.cuda) and nvcc is found.
  cpu   CPU kernels only: otherwise.
QUANT_CUDA_BUILD=cuda|cpu forces one (cuda then fails loudly when it cannot build);
the default "auto" picks as above. Standard variables are respected: CUDA_HOME
(default /usr/local/cuda when it has the headers), TORCH_CUDA_ARCH_LIST (default: the
visible GPUs, else DEFAULT_ARCHS) and MAX_JOBS (parallel compile jobs, ninja).
"""
from __future__ import annotations

import glob
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))

CPU_SOURCES = (
    "bindings.cpp",
    "status.cpp",
    "cpu_isa.cpp",
    "cpu_threads.cpp",
    "cpu_kernels.cpp",
    "cpu_kernels_amx.cpp",
    "cpu_kernels_avx512.cpp",
    "cpu_kernels_avx2.cpp",
    "cpu_kernels_scalar.cpp",
    "cpu_int8.cpp",
    "cpu_int8_avx512.cpp",
    "cpu_int8_fp32.cpp",
    "cpu_repack.cpp",
    "cpu_attention.cpp",
    "cpu_decode_layer.cpp",
    "bindings_decode.cpp",
)
REQUIRED_CUDA_SOURCES = ("gemm_4bit.cu",)
# Turing .. Hopper; CUDA 13 dropped sm_70/72 ("Unsupported gpu architecture 'compute_70'").
DEFAULT_ARCHS = "7.5;8.0;8.6;8.9;9.0"

# No -mavx512*/-mavx2/-mfma here: the AVX-512 and AVX2 functions carry target attributes
# and are picked at run time (cpu_isa.cpp), so the .so also runs on CPUs without them. A
# global -mavx2 would let the compiler vectorize the scalar fallback and torch's inline
# code with AVX2 and crash there.
# No -fopenmp: the kernels run on their own thread pool (cpu_threads.cpp).
# C++ standard: -std=c++20 given here, since cpu_threads.cpp needs it (std::atomic::wait).
# torch.utils.cpp_extension adds its own only when none is given: C++20 for torch 2.13+
# (the same flag), but C++17 for torch 2.11/2.12, which setup.py also supports.
CXX_FLAGS = ["-O3", "-Wall", "-Wno-unknown-pragmas", "-std=c++20"]
# The .cu files are torch-free and written against the plain CUDA headers (they also build
# with a bare nvcc); undo the __half/__nv_bfloat16 operator bans torch adds for ATen code.
# torch puts these extra flags after its own, so the -U wins.
NVCC_FLAGS = [
    "-O3",
    "--use_fast_math",
    "-lineinfo",
    "--threads=0",  # compile the TORCH_CUDA_ARCH_LIST architectures in parallel (0: one per CPU)
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
]
LINK_FLAGS = ["-pthread"]


class BuildConfigError(RuntimeError):
    pass


def _find_cuda_home() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home
    # `nvcc` on PATH may be a wrapper script, and torch's own guess (/usr/local) then lacks
    # cuda_runtime.h; the toolkit's standard location is the reliable default.
    if os.path.exists("/usr/local/cuda/include/cuda_runtime.h"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None


def _arch_list(torch) -> str:
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if not archs:
        if torch.cuda.is_available():
            caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
            archs = ";".join(f"{a}.{b}" for a, b in caps)
        else:
            # torch's own default needs a visible GPU (IndexError without one).
            archs = DEFAULT_ARCHS
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return archs


def choose_kind(torch) -> tuple[str, str]:
    """('cuda' | 'cpu', reason)."""
    mode = os.environ.get("QUANT_CUDA_BUILD", "auto").strip().lower()
    if mode not in ("auto", "cuda", "cpu"):
        raise BuildConfigError(f"QUANT_CUDA_BUILD={mode!r} must be auto, cuda or cpu")
    if mode == "cpu":
        return "cpu", "QUANT_CUDA_BUILD=cpu"
    cuda_home = _find_cuda_home()
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else None
    problems = []
    if not torch.version.cuda:
        problems.append(f"torch {torch.__version__} is not a CUDA build")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("nvcc not found (set CUDA_HOME to the CUDA toolkit)")
    elif not os.path.exists(os.path.join(cuda_home, "include", "cuda_runtime.h")):
        problems.append(f"CUDA_HOME={cuda_home} has no include/cuda_runtime.h")
    if not problems:
        # torch.utils.cpp_extension reads CUDA_HOME when it is first imported.
        os.environ["CUDA_HOME"] = cuda_home
        return "cuda", f"torch CUDA {torch.version.cuda}, nvcc {nvcc}"
    if mode == "cuda":
        raise BuildConfigError("QUANT_CUDA_BUILD=cuda but the CUDA kernels cannot be built: " + "; ".join(problems))
    return "cpu", "; ".join(problems)


def make_extension(prefix: str = ""):
    """The Extension for `quant_cuda`, sources relative to the calling setup script.

    prefix: path from the setup script's directory to this directory ("quant_cuda/" for
    the top-level setup.py, "" for quant_cuda/setup_cuda.py).
    Returns (extension, BuildExtension class, kind).
    """
    try:
        import torch
    except ImportError as e:
        raise BuildConfigError(
            f"building quant_cuda needs torch in this environment ({e}); install torch first and "
            "use `pip install --no-build-isolation -e .` so the build sees it"
        ) from None
    kind, reason = choose_kind(torch)
    from torch.utils import cpp_extension  # after choose_kind: it may set CUDA_HOME

    sources = [prefix + s for s in CPU_SOURCES]
    cxx = list(CXX_FLAGS)
    # RPATH to torch's libraries, so `import quant_cuda` also works before `import torch`.
    link = LINK_FLAGS + [f"-Wl,-rpath,{d}" for d in cpp_extension.library_paths()[:1]]
    if kind == "cuda":
        missing = [s for s in REQUIRED_CUDA_SOURCES if not os.path.exists(os.path.join(HERE, s))]
        if missing:
            raise BuildConfigError(
                f"CUDA build selected ({reason}) but {', '.join('quant_cuda/' + m for m in missing)} "
                "is missing; restore it, or build the CPU kernels only with QUANT_CUDA_BUILD=cpu"
            )
        cu = sorted(os.path.basename(p) for p in glob.glob(os.path.join(HERE, "*.cu")))
        sources += [prefix + s for s in cu]
        archs = _arch_list(torch)
        # Comma-separated and without quotes: it reaches the compiler through a ninja shell line.
        arch_macro = ",".join(a for a in archs.replace(";", " ").split() if a)
        cxx += ["-DQUANT_CUDA_WITH_CUDA", f"-DQUANT_CUDA_ARCHS={arch_macro}"]
        ext = cpp_extension.CUDAExtension(
            name="quant_cuda",
            sources=sources,
            extra_compile_args={"cxx": cxx, "nvcc": list(NVCC_FLAGS)},
            extra_link_args=link,
        )
        summary = f"CUDA + CPU kernels ({', '.join(cu)}; TORCH_CUDA_ARCH_LIST={archs})"
    else:
        ext = cpp_extension.CppExtension(
            name="quant_cuda",
            sources=sources,
            extra_compile_args={"cxx": cxx},
            extra_link_args=link,
        )
        summary = f"CPU kernels only ({reason})"
    jobs = os.environ.get("MAX_JOBS", "default: all cores")
    print(f"quant_cuda: building {summary}; torch {torch.__version__}; MAX_JOBS={jobs}", flush=True)
    return ext, cpp_extension.BuildExtension, kind
