"""`genserve bench`: load a running genserve with images or streamed chat, with a progress bar;
JSON + plot out."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import click


@click.command("bench")
@click.option("--url", default="http://127.0.0.1:8000", show_default=True)
@click.option("--api-key", envvar="GENSERVE_API_KEY", help="Default: env GENSERVE_API_KEY or .work/local_api_key.")
@click.option("--chat", is_flag=True, help="Streamed chat completions (tokens/s, TTFT) instead of images.")
@click.option("--model", default=None, help="Default: the server's default image model; 'chat' with --chat.")
@click.option("--prompt", default="a lighthouse at dawn, watercolor", show_default=True)
@click.option("--max-tokens", type=int, default=64, show_default=True, help="With --chat: tokens per answer.")
@click.option("--size", default=None, help="WxH")
@click.option("--steps", type=int, default=None)
@click.option("--requests", "n", type=int, default=64, show_default=True, help="Closed loop: total requests.")
@click.option("--concurrency", type=int, default=16, show_default=True, help="Closed loop: clients.")
@click.option("--rate", type=float, default=None, help="Open loop instead: requests per second ...")
@click.option("--duration", type=float, default=30.0, show_default=True, help="... for this many seconds.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
def bench(url: str, api_key: str | None, chat: bool, model: str | None, prompt: str, max_tokens: int,
          size: str | None, steps: int | None, n: int, concurrency: int, rate: float | None, duration: float,
          out: Path) -> None:
    """Closed loop at CONCURRENCY (default) or open loop at RATE: images/s or tokens/s and TTFT,
    p50/p95/p99, errors by status, batch sizes seen."""
    from benchmarks.loadgen import chat_request, closed_loop, image_request, open_loop

    key = api_key or (Path(".work/local_api_key").read_text().strip() if Path(".work/local_api_key").exists() else None)
    headers = {"Authorization": f"Bearer {key}"} if key else None
    if chat:
        body = {"model": model or "chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
        one = chat_request(body)
    else:
        body = {"prompt": prompt, **({"model": model} if model else {}), **({"size": size} if size else {}),
                **({"steps": steps} if steps else {})}
        one = image_request(body)
    total = int(rate * duration) if rate else n
    with click.progressbar(length=total, label="requests") as bar:
        done = lambda: bar.update(1)  # noqa: E731
        if rate:
            res = asyncio.run(open_loop(url, one, rate_per_s=rate, duration_s=duration, headers=headers, on_done=done))
        else:
            res = asyncio.run(closed_loop(url, one, total_requests=n, concurrency=concurrency, headers=headers,
                                          on_done=done))
    summary = {"url": url, "kind": "chat" if chat else "images", "mode": "open" if rate else "closed", "rate": rate,
               "concurrency": None if rate else concurrency, "body": body, **res.summary()}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{summary['kind']}-{summary['mode']}-{time.strftime('%Y%m%d-%H%M%S')}"
    stem.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    if chat:
        _plot(res.latencies_s, stem.with_suffix(".png"), right=("time to first token (s)", "requests", res.ttft_s))
    else:
        _plot(res.latencies_s, stem.with_suffix(".png"), right=("batch size", "images", res.batch_sizes))
    click.echo(json.dumps(summary, indent=2))
    click.echo(f"wrote {stem}.json and .png")


def _plot(latencies: list[float], path: Path, *, right: tuple[str, str, list]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # plots are optional outside the dev extra
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    axes[0].hist(latencies, bins=30)
    axes[0].set(xlabel="latency (s)", ylabel="requests", title="Latency")
    xlabel, ylabel, values = right
    if values and all(isinstance(v, int) for v in values):
        axes[1].hist(values, bins=range(1, max(values) + 2), align="left")
    elif values:
        axes[1].hist(values, bins=30)
    axes[1].set(xlabel=xlabel, ylabel=ylabel, title="Batch sizes seen" if xlabel == "batch size" else "TTFT")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
