#!/usr/bin/env python
"""`bluelm-eval-ppl`: perplexity of a model directory on a text (see bluelm_quant/cli/eval_ppl.py)."""
import sys

from bluelm_quant.cli.eval_ppl import main

if __name__ == "__main__":
    sys.exit(main())
