"""bluelm-quant: the Python package plus the compiled `quant_cuda` kernels.

    pip install --no-build-isolation -e .     (the build needs the environment's torch)

Builds CUDA + CPU kernels when torch is a CUDA build and nvcc is found, CPU kernels
only otherwise; the choice and its flags live in quant_cuda/build_ext_config.py.
"""
import os

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _build_config():
    # Loaded by path: `import quant_cuda.build_ext_config` breaks once the compiled
    # top-level `quant_cuda` module exists (see that file).
    import importlib.util

    path = os.path.join(HERE, "quant_cuda", "build_ext_config.py")
    spec = importlib.util.spec_from_file_location("_quant_cuda_build_ext_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ext, build_ext, _kind = _build_config().make_extension(prefix="quant_cuda/")

# Ranges, not pins: the package must install beside vLLM, whose CPU release 0.32 needs
# transformers < 5.20, and on machines with an older preinstalled torch. The test suite
# passes with transformers 5.17.0, 5.19.0 and 5.23.0 (requirements.txt keeps CI's pins).
INSTALL_REQUIRES = [
    "torch>=2.11,<2.15",
    "transformers>=5.17,<6",
    "safetensors>=0.6",
    "sentencepiece>=0.2",  # the BlueLM tokenizer
    "accelerate>=1.0",  # empty-weight model skeletons when loading a checkpoint
    "tqdm>=4.60",
]
EXTRAS_REQUIRE = {
    "plot": ["matplotlib>=3.5"],  # the quantization report's loss plot
    "smollm2": ["gguf>=0.10"],  # the built-in SmolLM2 demo model ships as a GGUF file
    # LoRA fine-tuning (bluelm_quant/lora.py, tools/finetune.py); tested with peft 0.21.2.
    "lora": ["peft>=0.21,<0.22"],
}

setup(
    name="bluelm-quant",
    version="0.1.0",
    description="4-bit GPTQ quantization and inference for BlueLM and LLaMA-like models",
    packages=find_packages(include=["bluelm_quant", "bluelm_quant.*"]),
    package_data={"bluelm_quant": ["texts/*"]},
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={
        "console_scripts": [
            "bluelm-quantize = bluelm_quant.cli.quantize:main",
            "bluelm-chat = bluelm_quant.cli.chat:main",
            "bluelm-eval-ppl = bluelm_quant.cli.eval_ppl:main",
            "bluelm-convert = bluelm_quant.cli.convert:main",
            "bluelm-finetune = bluelm_quant.cli.finetune:main",
            "bluelm-merge-adapter = bluelm_quant.cli.merge_adapter:main",
        ],
        # vLLM calls every `vllm.general_plugins` entry point in each of its processes:
        # this one registers BlueLM (bluelm_quant/vllm_plugin.py; a no-op without vLLM).
        "vllm.general_plugins": ["bluelm = bluelm_quant.vllm_plugin:register"],
    },
)
