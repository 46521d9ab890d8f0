#!/usr/bin/env python
"""One command that verifies bluelm-quant on a CUDA GPU and measures it; run it once per GPU.

Steps, each in its own process with a time limit, the whole run within --budget seconds
(8 minutes by default, sized for one H100/H200; a step that would start past the budget
is reported as skipped):

  build      the quant_cuda extension in place, for this GPU's architecture only
  tests      pytest -m cuda (kernels against a float64 oracle, CUDA loading)
  selfcheck  the kernels' first-use self-check on every configuration a 7B model uses
  kernels    tools/bench_kernels.py: M = 1..2048 on the 7B shapes against fp16 matmul,
             GB/s against the measured copy bandwidth, fused kernel vs dequantize + cuBLAS
  synthetic  a BlueLM-7B-shaped 4-bit checkpoint (tools/make_synthetic_checkpoint.py)
  load       tools/bench_load.py: load time, torch.cuda.max_memory_allocated after the load
             and after a 2048-token context
  generate   tools/bench_generate.py: prefill and decode tokens/s, 4-bit vs its fp16 twin

It runs with what the machine has (the repository on PYTHONPATH, nothing installed, no
network) and writes <out>/gpu_check.json, <out>/gpu_check.txt (the summary table) and one
log per step. Paste the table into the README, or into an issue when something fails.

    python tools/gpu_check.py --out /tmp/gpu_check
    python tools/gpu_check.py --smoke     # the same plumbing on the CPU with tiny shapes (CI)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"

SELF_CHECK = """
import json, torch
from bluelm_quant import kernel_check
from bluelm_quant.nn import QuantLinear
from bluelm_quant.config import QuantConfig
device, dtype = {device!r}, getattr(torch, {dtype!r})
for k, n, act_order in {shapes!r}:
    layer = QuantLinear.from_linear(torch.nn.Linear(k, n), QuantConfig(group_size=128, desc_act=act_order)).to(device, dtype)
    if act_order:
        layer.g_idx = layer.g_idx[torch.randperm(k, generator=torch.Generator().manual_seed(0))].to(device)
        layer.post_init()
    layer(torch.randn(1, k, device=device, dtype=dtype))
print(json.dumps(kernel_check.report()))
"""


@dataclass
class Step:
    name: str
    cmd: list[str]
    timeout: int
    env: dict = field(default_factory=dict)
    result: dict = field(default_factory=dict)


def run_step(step: Step, out: Path, deadline: float) -> dict:
    left = deadline - time.monotonic()
    if left < 10:
        return {"status": "skipped", "why": "out of time budget"}
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "PYTHONUNBUFFERED": "1",
           **step.env}
    log = out / f"{step.name}.log"
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(step.cmd) + "\n")
        f.flush()
        try:
            proc = subprocess.run(step.cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=min(step.timeout, left))
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {min(step.timeout, left):.0f} s"
    text = log.read_text(encoding="utf-8", errors="replace")
    return {"status": status, "seconds": round(time.monotonic() - start, 1), "log": log.name,
            "tail": text[-1500:] if status != "ok" else ""}


def plan(args, out: Path) -> list[Step]:
    py = sys.executable
    model = str(out / "synthetic-7b-4bit")
    if args.smoke:  # tiny shapes on the CPU: the plumbing, not the figures
        device, shapes, ms, iters = "cpu", "256x512", "1,8", "3"
        synth = ["--layers", "2", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--vocab", "512"]
        gen = ["--batch", "1", "--prompt", "16", "--new", "8", "--repeat", "1"]
        load = ["--variants", "fp32", "--context", "64"]
        selfcheck_shapes = [(256, 512, False), (512, 256, True)]
        kernel_extra = ["--heads", "", "--threads", "1"]  # no 49152-row int8 head: minutes on a busy CPU
        dtype = "float32"
    else:
        device, shapes, ms, iters = "cuda", "4096x4096,4096x11008,11008x4096", "1,2,4,8,16,32,64,128,512,2048", "20"
        synth = []
        gen = ["--batch", "1,16", "--prompt", "512", "--new", "128", "--repeat", "2"]
        load = ["--variants", "fp16,fp16+embed_cpu", "--context", "2048"]
        selfcheck_shapes = [(4096, 4096, False), (4096, 11008, False), (11008, 4096, False), (4096, 4096, True),
                            (11008, 4096, True)]
        kernel_extra = []
        dtype = "float16"
    steps = []
    if not args.smoke:
        arch = args.arch or _local_arch()
        steps.append(Step("build", [py, "setup.py", "--quiet", "build_ext", "--inplace"], 300,
                          {"QUANT_CUDA_BUILD": "cuda", "TORCH_CUDA_ARCH_LIST": arch,
                           "MAX_JOBS": str(os.cpu_count() or 4), "CUDA_HOME": os.environ.get("CUDA_HOME", _cuda_home())}))
        # --continue-on-collection-errors: a test file whose own dependency (hypothesis, for
        # test_packing.py) the lent machine lacks must not keep the CUDA tests from running.
        steps.append(Step("tests", [py, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
                                    "--continue-on-collection-errors", "tests"], 300))
    steps.append(Step("selfcheck", [py, "-c", SELF_CHECK.format(device=device, dtype=dtype, shapes=selfcheck_shapes)], 120))
    steps.append(Step("kernels", [py, str(TOOLS / "bench_kernels.py"), "--device", device, "--shapes", shapes, "--m", ms,
                                  "--iters", iters, *kernel_extra, "--json", str(out / "kernels.json")], 240))
    steps.append(Step("synthetic", [py, str(TOOLS / "make_synthetic_checkpoint.py"), "--out", model, "--overwrite", *synth], 240))
    steps.append(Step("load", [py, str(TOOLS / "bench_load.py"), "--model", model, "--device", device, *load,
                               "--json", str(out / "load.json")], 240))
    steps.append(Step("generate", [py, str(TOOLS / "bench_generate.py"), "--quant", model, "--fp", "dequant",
                                   "--device", device, *gen, "--json", str(out / "generate.json")], 300))
    return steps


def _local_arch() -> str:
    import torch

    major, minor = torch.cuda.get_device_capability()
    return f"{major}.{minor}"


def _cuda_home() -> str:
    nvcc = shutil.which("nvcc")
    return str(Path(nvcc).resolve().parent.parent) if nvcc else "/usr/local/cuda"


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError as e:
        env["transformers"] = f"not importable: {e}"
    if torch.cuda.is_available():
        env.update(gpu=torch.cuda.get_device_name(), capability=".".join(map(str, torch.cuda.get_device_capability())),
                   gpu_memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 1024**3, 1))
    return env


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summarize(steps: list[Step], out: Path) -> dict:
    """The figures worth a table, read back from each step's JSON or log."""
    s = {}
    tests = next((st for st in steps if st.name == "tests"), None)
    if tests and tests.result.get("log"):
        text = (out / tests.result["log"]).read_text(encoding="utf-8", errors="replace")
        found = re.findall(r"(\d+) (passed|failed|skipped|error)", text)
        s["tests"] = {kind: int(n) for n, kind in found}
    check = next(st for st in steps if st.name == "selfcheck")
    if check.result.get("status") == "ok":
        lines = (out / check.result["log"]).read_text(encoding="utf-8").strip().splitlines()
        s["selfcheck"] = json.loads(lines[-1])
    kernels = _json(out / "kernels.json")
    if kernels:
        rows = kernels.get("rows")
        if rows is None:  # --smoke: the CPU bench (bench_kernels_cpu.py) writes rows_4bit, times in ms
            rows = [{"k": r["k"], "n": r["n"], "m": r["m"], "us": 1000 * r["ms"],
                     "speedup_vs_fp32": r["fp32_ms"] / r["ms"] if r.get("fp32_ms") else 0}
                    for r in kernels.get("rows_4bit", [])]
        s["kernels"] = {"copy_gbs": kernels.get("copy_gbs"), "rows": rows, "dequant_crossover_m": _crossover(rows)}
    load = _json(out / "load.json")
    if load:
        s["load"] = load["results"]
    gen = _json(out / "generate.json")
    if gen:
        s["generate"] = gen["rows"]
    return s


def _crossover(rows: list[dict]) -> dict:
    """Per shape, the smallest M from which dequantize + matmul beats the fused kernel."""
    out = {}
    for r in rows:
        if "fused_us" in r and r["dequant_matmul_us"] < r["fused_us"]:
            key = f"{r['k']}x{r['n']}"
            out[key] = min(out.get(key, r["m"]), r["m"])
    return out


def table(report: dict) -> str:
    gib = 1024**3
    lines = [f"environment: {report['environment']}", "", "step | status | seconds"]
    lines += [f"{name} | {r['status']} | {r.get('seconds', '-')}" for name, r in report["steps"].items()]
    s = report["summary"]
    if "tests" in s:
        lines += ["", f"pytest -m cuda: {s['tests']}"]
    if "selfcheck" in s:
        bad = [c for c in s["selfcheck"] if not c["ok"]]
        lines += [f"self-check: {len(s['selfcheck'])} configurations, {len(bad)} mismatched"]
        lines += [f"  MISMATCH {c['config']}: {c['detail']}" for c in bad]
    if "kernels" in s:
        k = s["kernels"]
        if k.get("copy_gbs"):
            lines += ["", f"kernels (copy bandwidth {k['copy_gbs']:.0f} GB/s)", "K x N | M | us | GB/s | % copy | vs torch"]
        else:
            lines += ["", "kernels", "K x N | M | us | vs torch fp32"]
        for r in k["rows"]:
            if "copy_share" in r:
                lines.append(f"{r['k']}x{r['n']} | {r['m']} | {r['us']:.1f} | {r['gbs']:.0f} | {100 * r['copy_share']:.0f}% | "
                             f"{r['speedup_vs_torch']:.2f}x")
            else:
                lines.append(f"{r['k']}x{r['n']} | {r['m']} | {r['us']:.1f} | {r.get('speedup_vs_fp32', 0):.2f}x")
        if k["dequant_crossover_m"]:
            lines.append(f"dequantize + matmul wins from M = {k['dequant_crossover_m']} (ops.CUDA_DEQUANT_MIN_M)")
    if "load" in s:
        lines += ["", "load | seconds | max alloc after load GiB | after context GiB"]
        for r in s["load"]:
            after = r.get("cuda_max_allocated_generate", r.get("rss_peak_generate", 0))
            loaded = r.get("cuda_max_allocated_load", r.get("rss_peak", 0))
            lines.append(f"{r['variant']} | {r['load_s']:.1f} | {loaded / gib:.2f} | {after / gib:.2f}")
    if "generate" in s:
        lines += ["", "generate | batch | prefill tok/s | decode tok/s | peak GiB"]
        lines += [f"{r['model']} | {r['batch']} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['peak_bytes'] / gib:.2f}"
                  for r in s["generate"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="where results and logs go (default gpu_check_out/)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run (default 480)")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: this GPU's, e.g. 9.0)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the tool itself, measures nothing")
    p.add_argument("--skip", default="", help="comma list of steps to leave out")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget
    import torch

    if not args.smoke and not torch.cuda.is_available():
        print(f"error: no CUDA GPU is visible to torch {torch.__version__} (CUDA {torch.version.cuda}); "
              "run this on a machine with one, or pass --smoke to check the tool on the CPU", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [s for s in plan(args, args.out) if s.name not in args.skip.split(",")]
    for step in steps:
        print(f"[gpu_check] {step.name} ...", flush=True)
        step.result = run_step(step, args.out, deadline)
        print(f"[gpu_check] {step.name}: {step.result['status']} ({step.result.get('seconds', 0)} s)", flush=True)
        if step.name == "build" and step.result["status"] != "ok":
            print("[gpu_check] the build failed: the remaining steps would measure the reference path; stopping",
                  file=sys.stderr)
            break
    report = {"environment": environment(), "steps": {s.name: s.result for s in steps if s.result},
              "summary": summarize([s for s in steps if s.result], args.out)}
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    text = table(report)
    (args.out / "gpu_check.txt").write_text(text + "\n", encoding="utf-8")
    print(text)
    shutil.rmtree(args.out / "synthetic-7b-4bit", ignore_errors=True)  # 5 GB of random weights
    failed = [n for n, r in report["steps"].items() if r["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
