"""Build and install only the compiled `quant_cuda` module (the BlueLM README's command):

    cd quant_cuda && python setup_cuda.py install

The same extension as the top-level setup.py (flags and CUDA/CPU choice in
build_ext_config.py); `pip install --no-build-isolation -e .` at the repository root
installs it together with the bluelm_quant package.
"""
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
os.chdir(HERE)  # sources are given relative to this directory

# Loaded by path: `import build_ext_config` would work here, but keep one mechanism
# with setup.py (where the package-style import breaks once quant_cuda.*.so exists).
_spec = importlib.util.spec_from_file_location("_quant_cuda_build_ext_config", os.path.join(HERE, "build_ext_config.py"))
_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_config)

ext, build_ext, _kind = _config.make_extension(prefix="")

setup(
    name="quant_cuda",
    version="0.1.0",
    description="bluelm-quant 4-bit GPTQ kernels (torch.ops.bluelm_quant)",
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
)
