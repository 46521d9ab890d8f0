#!/usr/bin/env python
"""`bluelm-convert`: rewrite a 4-bit checkpoint into the standard GPTQ layout (see bluelm_quant/cli/convert.py)."""
import sys

from bluelm_quant.cli.convert import main

if __name__ == "__main__":
    sys.exit(main())
