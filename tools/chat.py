#!/usr/bin/env python
"""`bluelm-chat`: multi-turn chat in the terminal (see bluelm_quant/cli/chat.py)."""
import sys

from bluelm_quant.cli.chat import main

if __name__ == "__main__":
    sys.exit(main())
