#!/usr/bin/env python
"""`bluelm-quantize`: quantize a Hugging Face model to 4-bit GPTQ (see bluelm_quant/cli/quantize.py)."""
import sys

from bluelm_quant.cli.quantize import main

if __name__ == "__main__":
    sys.exit(main())
