"""`genserve bench`: load a running genserve with images, with a progress bar; JSON + plot out."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click


@click.command("bench")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--api-key", envvar="GENSERVE_API_KEY", help="Default: env GENSERVE_API_KEY or .work/local_api_key.")
@click.option("--model", default=None)
@click.option("--prompt", default="a lighthouse at dawn, watercolor", show_default=True)
@click.option("--size", default=None, help="WxH")
@click.option("--steps", type=int, default=None)
@click.option("--requests", "n", type=int, default=64, show_default=True, help="Closed loop: total requests.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Closed loop: clients.")
@click.option("--rate", type=float, default=None, help="Open loop instead: requests per second ...")
@click.option("--duration", type=float, default=30.0, show_default=True, help="... for this many seconds.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
def bench(url: str, api_key: str | None, model: str | None, prompt: str, size: str | None, steps: int | None, n: int,
          concurrency: int, rate: float | None, duration: float, out: Path) -> None:
    """Closed loop at CONCURRENCY (default) or open loop at RATE; images/s, p50/p95/p99, batches."""
    from benchmarks.loadgen import closed_loop_images, open_loop_images

    key = api_key or (Path(".work/local_api_key").read_text().strip() if Path(".work/local_api_key").exists() else None)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    body = {"prompt": prompt, **({"model": model} if model else {}), **({"size": size} if size else {}),
            **({"steps": steps} if steps else {})}
    total = int(rate * duration) if rate else n
    with click.progressbar(length=total, label="requests") as bar:
        done = lambda: bar.update(1)  # noqa: E731
        if rate:
            res = asyncio.run(open_loop_images(url, body, rate_per_s=rate, duration_s=duration, headers=headers,
                                               on_done=done))
        else:
            res = asyncio.run(closed_loop_images(url, body, total_requests=n, concurrency=concurrency,
                                                 headers=headers, on_done=done))
    summary = {"url": url, "mode": "open" if rate else "closed", "rate": rate, "concurrency": None if rate else concurrency,
               "body": body, **res.summary()}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{summary['mode']}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot(res.latencies_s, res.batch_sizes, stem.with_suffix(".png"))
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"wrote {stem}.json and .png")


def _plot(latencies: list[float], batches: list[int], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional outside the dev extra
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].hist(latencies, bins=30)
    axes[0].set(xlabel="latency (s)", ylabel="requests", title="Latency")
    if batches:
        axes[1].hist(batches, bins=range(1, max(batches) + 2), align="left")
    axes[1].set(xlabel="batch size", ylabel="images", title="Batch sizes seen")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
