from setuptools import find_packages, setup

setup(
    name="bluelm-quant",
    version="0.1.0",
    description="4-bit GPTQ quantization and inference for BlueLM and LLaMA-like models",
    packages=find_packages(include=["bluelm_quant", "bluelm_quant.*"]),
    python_requires=">=3.10",
)
