"""Plots for committed benchmark results (matplotlib PNGs beside the JSON).

    python -m benchmarks.plot benchmarks/results/gpu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _curve(result: dict, rows: list[dict], *, batch_key: str, latency_key: str, titles: tuple[str, str],
           xlabel: str, path: Path) -> Path:
    """images/s and a latency vs batch size, one line per (size, steps)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for size, steps in sorted({(r["size"], r["steps"]) for r in rows}):
        pts = [r for r in rows if (r["size"], r["steps"]) == (size, steps)]
        b = [r[batch_key] for r in pts]
        axes[0].plot(b, [r["images_per_s"] for r in pts], marker="o", label=f"{size}² / {steps} steps")
        axes[1].plot(b, [r[latency_key] for r in pts], marker="o", label=f"{size}² / {steps} steps")
    axes[0].set(xscale="log", xlabel=xlabel, ylabel="images/s", title=titles[0])
    axes[1].set(xscale="log", yscale="log", xlabel=xlabel, ylabel=titles[1], title="Latency")
    for ax in axes:
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['machine']['device']}, {result['model']}, {result['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def batching_curve(result: dict, out: Path) -> Path:
    """The raw pipeline's batching curve (phase `raw`)."""
    rows = [c for c in result["raw"]["curve"] if "images_per_s" in c]
    return _curve(result, rows, batch_key="batch", latency_key="batch_p95_s", xlabel="batch size",
                  titles=("Raw pipeline throughput", "p95 batch latency (s)"), path=out / "batching_curve.png")


def serving(result: dict, out: Path) -> Path:
    s, f = result["serve"], result["fractional"]
    raw = (s["raw_before"]["images_per_s"] + s["raw_after"]["images_per_s"]) / 2
    labels = ["raw pipeline", "graph 1 x 1.0 GPU", "graph 2 x 0.5 GPU"]
    values = [raw, s["graph"]["images_per_s"], f["two_half"]["images_per_s"]]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bars = ax.bar(labels, values, color=["#888", "#3a7", "#37a"])
    for bar, v in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, v, f"{v:.1f} ({v / raw:.0%})", ha="center", va="bottom")
    g = s["graph"]
    ax.set(ylabel="images/s", title=f"SDXL {g['size']}² / {g['steps']} steps, batch {g['batch']}, over HTTP")
    fig.tight_layout()
    path = out / "serving.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def serve_curve(result: dict, out: Path) -> Path:
    """The batching curve measured through the graph (phase `curve`): images/s and request p95."""
    return _curve(result, result["curve"]["points"], batch_key="max_batch_size", latency_key="p95_s",
                  xlabel="max_batch_size", titles=("Through the graph (HTTP, 2 x batch clients)", "request p95 (s)"),
                  path=out / "serve_curve.png")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")
    raw = json.loads((folder / "h200-part1.json").read_text())
    served = json.loads((folder / "h200-part4.json").read_text())
    curve = json.loads((folder / "h100-curve.json").read_text())
    for p in (batching_curve(raw, folder), serving(served, folder), serve_curve(curve, folder)):
        print("wrote", p)


if __name__ == "__main__":
    main()
