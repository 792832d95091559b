"""A small asyncio load generator for genserve's HTTP API: images or streamed chat, closed loop at
concurrency C or open loop at rate R.

Used by the benchmark scripts here and by `genserve bench`; `python -m benchmarks.loadgen --help`
runs it standalone. A request kind is a function that sends one request and records what it saw
(`image_request`, `chat_request`); `closed_loop` and `open_loop` drive either.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    images: int = 0
    completion_tokens: int = 0
    wall_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # whole answers (last byte), successes only
    ttft_s: list[float] = field(default_factory=list)  # chat: first content token
    batch_sizes: list[int] = field(default_factory=list)
    queue_wait_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    status_counts: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s if self.wall_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float, xs: list[float] | None = None) -> float:
        xs = sorted(self.latencies_s if xs is None else xs)
        if not xs:
            return float("nan")
        return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]

    def count(self, status: str) -> None:
        self.status_counts[status] = self.status_counts.get(status, 0) + 1

    def summary(self) -> dict:
        out = {
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
        if self.ttft_s or self.completion_tokens:
            out |= {"completion_tokens": self.completion_tokens, "tokens_per_s": round(self.tokens_per_s, 2),
                    **{f"ttft_p{q}_s": round(self.percentile(q, self.ttft_s), 4) for q in (50, 95, 99)}}
        return out


# One request: send it, record what the answer says; return its status ("200", "429", ...).
RequestFn = Callable[[httpx.AsyncClient, LoadResult], Awaitable[str]]


def image_request(body: dict) -> RequestFn:
    async def one(client: httpx.AsyncClient, result: LoadResult) -> str:
        t0 = time.perf_counter()
        r = await client.post("/v1/images/generations", json=body)
        if r.status_code != 200:
            return str(r.status_code)
        result.latencies_s.append(time.perf_counter() - t0)
        payload = r.json()
        result.images += len(payload["data"])
        info = payload.get("genserve") or {}
        result.batch_sizes += info.get("batch_sizes", [])
        result.queue_wait_s += info.get("queue_wait_s", [])
        result.compute_s += info.get("compute_s", [])
        return "200"

    return one


def chat_request(body: dict) -> RequestFn:
    """A streamed chat completion (SSE): TTFT at the first content delta, tokens from `usage`."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}

    async def one(client: httpx.AsyncClient, result: LoadResult) -> str:
        t0, ttft, tokens = time.perf_counter(), None, 0
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return str(r.status_code)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:  # failed after the stream began
                    return "stream_error"
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
        result.latencies_s.append(time.perf_counter() - t0)
        if ttft is not None:
            result.ttft_s.append(ttft)
        result.completion_tokens += tokens
        return "200"

    return one


async def _send(one: RequestFn, client: httpx.AsyncClient, result: LoadResult,
                on_done: Callable[[], None] | None) -> None:
    try:
        status = await one(client, result)
    except httpx.HTTPError as e:
        status = type(e).__name__
    result.requests += 1
    result.count(status)
    if status != "200":
        result.errors += 1
    if on_done:
        on_done()


async def closed_loop(base_url: str, one: RequestFn, *, total_requests: int, concurrency: int,
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
                await _send(one, client, result, on_done)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


async def open_loop(base_url: str, one: RequestFn, *, rate_per_s: float, duration_s: float,
                    headers: dict | None = None, timeout_s: float = 600,
                    on_done: Callable[[], None] | None = None) -> LoadResult:
    """Requests sent at a fixed rate whatever the answers (arrivals don't wait for the service):
    what a public endpoint sees; queueing shows up as latency, overload as 429/503."""
    result = LoadResult()
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, headers=headers,
                                 limits=httpx.Limits(max_connections=None)) as client:
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate_per_s * duration_s)):
            delay = start + i / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(_send(one, client, result, on_done)))
        await asyncio.gather(*tasks)
        result.wall_s = time.perf_counter() - start
    return result


async def closed_loop_images(base_url: str, body: dict, **kw) -> LoadResult:  # type: ignore[no-untyped-def]
    return await closed_loop(base_url, image_request(body), **kw)


async def open_loop_images(base_url: str, body: dict, **kw) -> LoadResult:  # type: ignore[no-untyped-def]
    return await open_loop(base_url, image_request(body), **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--chat", action="store_true", help="streamed chat completions instead of images")
    ap.add_argument("--prompt", default="a lighthouse at dawn")
    ap.add_argument("--model", default=None)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--api-key", default=None)
    a = ap.parse_args()
    if a.chat:
        one = chat_request({"model": a.model or "chat", "messages": [{"role": "user", "content": a.prompt}],
                            "max_tokens": a.max_tokens})
    else:
        one = image_request({"prompt": a.prompt, **({"model": a.model} if a.model else {})})
    headers = {"Authorization": f"Bearer {a.api_key}"} if a.api_key else None
    res = asyncio.run(closed_loop(a.url, one, total_requests=a.requests, concurrency=a.concurrency, headers=headers))
    print(json.dumps(res.summary(), indent=2))


if __name__ == "__main__":
    main()
