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
    for bar, v in zip(bars, values, strict=False):
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


def llm_overhead(results: list[tuple[str, dict]], path: Path) -> Path:
    """Per front (proxy, HAProxy, ...) and concurrency: each round's tokens/s of both sides (the
    spread is the point), and TTFT p50 direct vs through the graph."""
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    labels, x = [], 0
    for name, result in results:
        for run in result["runs"]:
            d, s = run["direct"]["rounds"], run["serve"]["rounds"]
            ax_t.scatter([x - 0.15] * len(d), [r["tokens_per_s"] for r in d], color="#888", s=18)
            ax_t.scatter([x + 0.15] * len(s), [r["tokens_per_s"] for r in s], color="#3a7", s=18)
            ax_t.text(x, max(r["tokens_per_s"] for r in d + s) * 1.03,
                      f"{run['serve_vs_direct']['tokens_per_s_ratio']:.2f}x", ha="center", fontsize=8)
            ax_f.bar([x - 0.2, x + 0.2], [run["direct"]["ttft_ms_p50"], run["serve"]["ttft_ms_p50"]], width=0.4,
                     color=["#888", "#3a7"])
            labels.append(f"{name}\n{run['concurrency']} client{'s' if run['concurrency'] > 1 else ''}")
            x += 1
    for ax in (ax_t, ax_f):
        ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax_t.set(ylabel="tokens/s per round (grey: engine, green: graph)", title="LLM tokens/s, alternating rounds")
    ax_f.set(ylabel="TTFT p50 (ms)", title="time to first token (grey: engine, green: graph)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def llm_schedulers(result: dict, path: Path) -> Path:
    """Continuous vs static batching per concurrency: tokens/s and TTFT p50 (engine only)."""
    runs = result["runs"]
    xs = range(len(runs))
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, unit in ((ax_t, "tokens_per_s", "tokens/s"), (ax_f, "ttft_ms_p50", "TTFT p50 (ms)")):
        ax.bar([x - 0.2 for x in xs], [r[key]["continuous"] for r in runs], width=0.4, color="#3a7", label="continuous")
        ax.bar([x + 0.2 for x in xs], [r[key]["static"] for r in runs], width=0.4, color="#888", label="static")
        ax.set_xticks(list(xs), [f"{r['concurrency']} clients" for r in runs])
        ax.set(ylabel=unit, title=f"{unit}, {result.get('device', '')}")
    ax_t.legend(fontsize=8)
    fig.tight_layout()
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
    fronts = [(label, folder / f"llm_overhead-h200-{stem}.json") for label, stem in
              (("Serve proxy", "proxy-continuous"), ("HAProxy", "haproxy-continuous"),
               ("HAProxy, 1 ms GIL", "haproxy-continuous-gil1"))]
    found = [(label, json.loads(f.read_text())) for label, f in fronts if f.exists()]
    if found:
        print("wrote", llm_overhead(found, folder / "llm_h200.png"))


if __name__ == "__main__":
    main()
