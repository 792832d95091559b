"""A small asyncio load generator for genserve's HTTP API (closed loop at concurrency C).

Used by the benchmark scripts here; `python -m benchmarks.loadgen --help` runs it standalone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    images: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return float("nan")
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    def summary(self) -> dict:
        return {
            "requests": self.requests, "errors": self.errors, "images": self.images,
            "wall_s": round(self.wall_s, 3), "images_per_s": round(self.images_per_s, 3),
            "p50_s": round(self.percentile(50), 4), "p95_s": round(self.percentile(95), 4),
            "p99_s": round(self.percentile(99), 4),
            "mean_batch": round(statistics.mean(self.batch_sizes), 2) if self.batch_sizes else None,
            "max_batch": max(self.batch_sizes) if self.batch_sizes else None,
            "mean_queue_wait_s": round(statistics.mean(self.queue_wait_s), 4) if self.queue_wait_s else None,
            "mean_batch_compute_s": round(statistics.mean(self.compute_s), 4) if self.compute_s else None,
            "status_counts": self.status_counts,
        }


async def closed_loop_images(base_url: str, body: dict, *, total_requests: int, concurrency: int,
                             headers: dict | None = None, timeout_s: float = 600,
                             on_done: Callable[[], None] | None = None) -> LoadResult:
    """`concurrency` clients, each sending its next request when the previous one is answered."""
    result = LoadResult()
    remaining = total_requests
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits, headers=headers) as client:

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                t0 = time.perf_counter()
                r = await client.post("/v1/images/generations", json=body)
                result.latencies_s.append(time.perf_counter() - t0)
                result.requests += 1
                if on_done:
                    on_done()
                result.status_counts[str(r.status_code)] = result.status_counts.get(str(r.status_code), 0) + 1
                if r.status_code != 200:
                    result.errors += 1
                    continue
                payload = r.json()
                result.images += len(payload["data"])
                info = payload.get("genserve") or {}
                result.batch_sizes += info.get("batch_sizes", [])
                result.queue_wait_s += info.get("queue_wait_s", [])
                result.compute_s += info.get("compute_s", [])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


async def open_loop_images(base_url: str, body: dict, *, rate_per_s: float, duration_s: float,
                           headers: dict | None = None, timeout_s: float = 600,
                           on_done: Callable[[], None] | None = None) -> LoadResult:
    """Requests sent at a fixed rate whatever the answers (arrivals don't wait for the service):
    what a public endpoint sees; queueing shows up as latency, overload as 429/503."""
    result = LoadResult()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers,
                                 limits=httpx.Limits(max_connections=None)) as client:

        async def one() -> None:
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/images/generations", json=body)
            except httpx.HTTPError as e:
                result.errors += 1
                result.status_counts[type(e).__name__] = result.status_counts.get(type(e).__name__, 0) + 1
                return
            finally:
                result.requests += 1
                if on_done:
                    on_done()
            result.latencies_s.append(time.perf_counter() - t0)
            result.status_counts[str(r.status_code)] = result.status_counts.get(str(r.status_code), 0) + 1
            if r.status_code != 200:
                result.errors += 1
                return
            info = r.json().get("genserve") or {}
            result.images += len(r.json()["data"])
            result.batch_sizes += info.get("batch_sizes", [])

        start = time.perf_counter()
        tasks = []
        n = int(rate_per_s * duration_s)
        for i in range(n):
            delay = start + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
        result.wall_s = time.perf_counter() - start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--prompt", default="a lighthouse at dawn")
    ap.add_argument("--model", default=None)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args()
    body = {"prompt": a.prompt, **({"model": a.model} if a.model else {})}
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    res = asyncio.run(closed_loop_images(a.url, body, total_requests=a.requests, concurrency=a.concurrency,
                                         headers=headers))
    print(json.dumps(res.summary(), indent=2))


if __name__ == "__main__":
    main()
