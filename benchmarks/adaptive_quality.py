"""Adaptive quality under a load step: timeline of offered load, steps used and p95 latency.

Phases: calm (1 client) -> load (C clients) -> calm. Every request sends `quality: "auto"`.
Run against a running app (e.g. `make run`, configs/local.yaml):

    python -m benchmarks.adaptive_quality --url http://127.0.0.1:8000 --key $KEY --clients 16

Prints one line per second and writes benchmarks/results/adaptive_quality-<ts>.json (+ .png when
matplotlib is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).parent / "results"


def p95(xs: list[float]) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


async def run(url: str, key: str, model: str, size: str, n: int, phases: list[tuple[str, int, float]]) -> list[dict]:
    samples: list[dict] = []  # one per finished request
    t0 = time.monotonic()
    body = {"prompt": "a lighthouse at dusk", "model": model, "size": size, "n": n, "quality": "auto"}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as http:
        for phase, clients, seconds in phases:
            end = time.monotonic() + seconds

            async def client() -> None:
                while time.monotonic() < end:
                    start = time.monotonic()
                    r = await http.post("/v1/images/generations", json=body)
                    info = r.json().get("genserve", {}) if r.status_code == 200 else {}
                    samples.append({"t": round(time.monotonic() - t0, 3), "phase": phase, "clients": clients,
                                    "status": r.status_code, "latency_s": round(time.monotonic() - start, 4),
                                    "steps_used": info.get("steps_used", []),
                                    "degraded": bool(info.get("degraded"))})

            await asyncio.gather(*(client() for _ in range(clients)))
    return samples


def timeline(samples: list[dict]) -> list[dict]:
    rows = []
    for sec in range(int(max((s["t"] for s in samples), default=0)) + 1):
        xs = [s for s in samples if sec <= s["t"] < sec + 1]
        if not xs:
            continue
        steps = [st for s in xs for st in s["steps_used"]]
        rows.append({"t": sec, "clients": max(s["clients"] for s in xs), "requests": len(xs),
                     "steps_mean": round(sum(steps) / len(steps), 2) if steps else None,
                     "degraded": sum(s["degraded"] for s in xs),
                     "p95_s": round(p95([s["latency_s"] for s in xs]), 4)})
    return rows


def plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    t = [r["t"] for r in rows]
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    for ax, key, label in zip(axes, ("clients", "steps_mean", "p95_s"), ("load (clients)", "steps used", "p95 (s)")):
        ax.plot(t, [r[key] for r in rows], marker=".")
        ax.set_ylabel(label)
    axes[-1].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", default="sdxl-tiny")
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--calm-s", type=float, default=5.0)
    ap.add_argument("--load-s", type=float, default=10.0)
    a = ap.parse_args()
    phases = [("calm", 1, a.calm_s), ("load", a.clients, a.load_s), ("after", 1, a.calm_s)]
    samples = asyncio.run(run(a.url, a.key, a.model, a.size, a.n, phases))
    rows = timeline(samples)
    print(f"{'t':>4} {'clients':>7} {'reqs':>5} {'steps':>6} {'degr':>5} {'p95_s':>7}")
    for r in rows:
        print(f"{r['t']:>4} {r['clients']:>7} {r['requests']:>5} {r['steps_mean']!s:>6} {r['degraded']:>5} "
              f"{r['p95_s']:>7}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"adaptive_quality-{int(time.time())}.json"
    out.write_text(json.dumps({"args": vars(a) | {"key": "***"}, "timeline": rows, "samples": samples}, indent=1))
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot(rows, out.with_suffix(".png")) else ""))


if __name__ == "__main__":
    main()
