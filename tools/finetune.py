#!/usr/bin/env python
"""`bluelm-finetune`: LoRA fine-tuning of a 4-bit model (see bluelm_quant/cli/finetune.py)."""
import sys

from bluelm_quant.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
