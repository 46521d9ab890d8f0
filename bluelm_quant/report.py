"""The end-of-run summary: per-layer loss, time and size, as JSON, a table and a plot.

The report is written after the checkpoint is published, and is optional: a failure to
write it (matplotlib missing, a full disk) is a one-line warning, never a failed run.
"""
from __future__ import annotations

import logging
import os

from .atomic import write_json

log = logging.getLogger(__name__)

JSON_FILE = "quantize_report.json"
PLOT_FILE = "quantize_report.png"


def summarize(per_layer: list[dict]) -> dict:
    before = sum(s["bytes_fp16"] for s in per_layer)
    after = sum(s["bytes_quantized"] for s in per_layer)
    return {
        "layers": len(per_layer),
        "seconds": round(sum(s["seconds"] for s in per_layer), 3),
        "linear_bytes_fp16": before,
        "linear_bytes_quantized": after,
        "compression": round(before / after, 3) if after else None,
        "mean_loss": {
            name: sum(s["linears"][name]["loss"] for s in per_layer) / len(per_layer)
            for name in (per_layer[0]["linears"] if per_layer else {})
        },
    }


def table(per_layer: list[dict]) -> str:
    names = list(per_layer[0]["linears"]) if per_layer else []
    short = [n.split(".")[-1] for n in names]
    head = f"{'layer':>5} " + " ".join(f"{s:>10}" for s in short) + f" {'seconds':>8} {'MB fp16':>8} {'MB 4bit':>8}"
    rows = [head, "-" * len(head)]
    for s in per_layer:
        losses = " ".join(f"{s['linears'][n]['loss']:>10.4g}" for n in names)
        rows.append(
            f"{s['layer']:>5} {losses} {s['seconds']:>8.2f} {s['bytes_fp16'] / 1e6:>8.2f} {s['bytes_quantized'] / 1e6:>8.2f}"
        )
    return "\n".join(rows)


def plot(per_layer: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    layers = [s["layer"] for s in per_layer]
    for name in per_layer[0]["linears"]:
        ax.plot(layers, [s["linears"][name]["loss"] for s in per_layer], marker="o", ms=3, label=name.split(".")[-1])
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("GPTQ loss (log scale)")
    ax.set_title("Per-layer quantization error")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(ncol=4, fontsize=8)
    fig.tight_layout()
    tmp = path + ".tmp"
    try:  # into place whole: the checkpoint directory is already published
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_report(directory: str, per_layer: list[dict], settings: dict) -> dict:
    """The report as a dict; also written to `directory` as JSON and a PNG plot where possible."""
    report = {"summary": summarize(per_layer), "settings": settings, "layers": per_layer}
    try:
        write_json(os.path.join(directory, JSON_FILE), report)
    except OSError as e:
        log.warning("the report %s was not written (%s); the checkpoint is complete", JSON_FILE, e)
    if per_layer:
        try:
            plot(per_layer, os.path.join(directory, PLOT_FILE))
        except ImportError as e:
            log.warning("no %s plot: %s (pip install matplotlib for it); the checkpoint is complete", PLOT_FILE, e)
        except Exception as e:  # noqa: BLE001 - an optional picture must not fail a finished run
            log.warning("no %s plot (%s: %s); the checkpoint is complete", PLOT_FILE, type(e).__name__, e)
    return report
