#!/usr/bin/env python
"""Peak memory of a whole `bluelm-quantize` command, phase by phase.

Runs tools/quantize.py with the given arguments in a child process and prints, for each
phase (quantization; the before/after perplexities; the 4-bit demo answer), its duration,
the highest resident set size sampled during it, and the child's high-water mark (VmHWM)
when it ended. The phases are told apart by the lines the command prints after each one.
The last line is the exact peak of the whole command (getrusage of the child).

    python tools/bench_quantize_command.py -- --model /tmp/llama7b-synth --out /tmp/q
    (any tools/quantize.py flags after --; the defaults are what a user gets)

Linux only (/proc). Build a 7B-shaped model with tools/make_synthetic_checkpoint.py
(--arch llama --full --dtype bfloat16 --vocab 32000 [--layers 2]) and put a tokenizer whose
ids fit the vocabulary beside it.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import threading
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
# (phase, the stdout line that starts with this ends it)
PHASES = (("quantize", "Quantized "), ("perplexity (both models)", "Perplexity on bundled"),
          ("4-bit demo answer", "4-bit model, greedy"))
GB = 1e9


def _status(pid: int, field: str) -> int | None:
    """A /proc/<pid>/status size field in bytes (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=0.05, help="RSS sampling interval in seconds (default 0.05)")
    p.add_argument("quantize_args", nargs=argparse.REMAINDER, help="arguments for tools/quantize.py, after --")
    args = p.parse_args(argv)
    child_args = args.quantize_args[1:] if args.quantize_args[:1] == ["--"] else args.quantize_args

    cmd = [sys.executable, os.path.join(TOOLS, "quantize.py"), *child_args]
    print("command:", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    rows, current = [], {"name": PHASES[0][0], "start": time.perf_counter(), "peak": 0}
    lock = threading.Lock()

    def read_stdout():
        nonlocal current
        phase = 0
        for line in proc.stdout:
            sys.stdout.write("  | " + line)
            if phase < len(PHASES) and line.startswith(PHASES[phase][1]):
                with lock:
                    rows.append((current["name"], time.perf_counter() - current["start"], current["peak"],
                                 _status(proc.pid, "VmHWM") or 0))
                    phase += 1
                    name = PHASES[phase][0] if phase < len(PHASES) else "rest"
                    current = {"name": name, "start": time.perf_counter(), "peak": 0}

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = _status(proc.pid, "VmRSS")
        if rss is not None:
            with lock:
                current["peak"] = max(current["peak"], rss)
        time.sleep(args.interval)
    reader.join()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    rows.append((current["name"], time.perf_counter() - current["start"], current["peak"], peak))

    print(f"\n{'phase':<26}{'seconds':>9}{'peak RSS sampled (GB)':>24}{'VmHWM at its end (GB)':>24}")
    for name, seconds, sampled, hwm in rows:
        print(f"{name:<26}{seconds:>9.1f}{sampled / GB:>24.2f}{hwm / GB:>24.2f}")
    print(f"\nexit status {proc.returncode}; peak RSS of the whole command: {peak / GB:.2f} GB")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
