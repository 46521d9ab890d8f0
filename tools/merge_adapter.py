#!/usr/bin/env python
"""`bluelm-merge-adapter`: base model + LoRA adapter -> one merged model (see bluelm_quant/cli/merge_adapter.py)."""
import sys

from bluelm_quant.cli.merge_adapter import main

if __name__ == "__main__":
    sys.exit(main())
