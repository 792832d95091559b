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


def batching_curve(result: dict, out: Path) -> Path:
    curve = [c for c in result["raw"]["curve"] if "images_per_s" in c]
    shapes = sorted({(c["size"], c["steps"]) for c in curve})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for size, steps in shapes:
        pts = [c for c in curve if (c["size"], c["steps"]) == (size, steps)]
        b = [c["batch"] for c in pts]
        axes[0].plot(b, [c["images_per_s"] for c in pts], marker="o", label=f"{size}² / {steps} steps")
        axes[1].plot(b, [c["batch_p95_s"] for c in pts], marker="o", label=f"{size}² / {steps} steps")
    axes[0].set(xscale="log", xlabel="batch size", ylabel="images/s", title="Raw pipeline throughput")
    axes[1].set(xscale="log", yscale="log", xlabel="batch size", ylabel="p95 batch latency (s)", title="Latency")
    for ax in axes:
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['machine']['device']}, {result['model']}, {result['dtype']}")
    fig.tight_layout()
    path = out / "batching_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    pts = result["curve"]["points"]
    shapes = sorted({(p["size"], p["steps"]) for p in pts})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for size, steps in shapes:
        row = [p for p in pts if (p["size"], p["steps"]) == (size, steps)]
        b = [p["max_batch_size"] for p in row]
        axes[0].plot(b, [p["images_per_s"] for p in row], marker="o", label=f"{size}² / {steps} steps")
        axes[1].plot(b, [p["p95_s"] for p in row], marker="o", label=f"{size}² / {steps} steps")
    axes[0].set(xscale="log", xlabel="max_batch_size", ylabel="images/s", title="Through the graph (HTTP, 2 x batch clients)")
    axes[1].set(xscale="log", yscale="log", xlabel="max_batch_size", ylabel="request p95 (s)", title="Latency")
    for ax in axes:
        ax.set_xticks([1, 2, 4, 8, 16], labels=["1", "2", "4", "8", "16"])
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['machine']['device']}, {result['model']}, {result['dtype']}")
    fig.tight_layout()
    path = out / "serve_curve.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/gpu")
    raw = json.loads((folder / "h200-part1.json").read_text())
    served = json.loads((folder / "h200-part4.json").read_text())
    curve = json.loads((folder / "h100-curve.json").read_text())
    for p in (batching_curve(raw, folder), serving(served, folder), serve_curve(curve, folder)):
        print("wrote", p)


if __name__ == "__main__":
    main()
