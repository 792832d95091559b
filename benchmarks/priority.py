"""Plan priority, in ONE run: a high-priority tenant's p95 unloaded, then while a low-priority
tenant saturates the diffusion replica with many clients; the ratio of the two; the low tenant's
throughput meanwhile (it must keep progressing); and, as a control, an equal-priority tenant's
p95 under the same saturation (what the high tenant would get without priority).

    python -m benchmarks.priority [--bulk-clients 12 --saturated-s 30]

Starts its own local Ray cluster and app (benchmarks/local_app.py: tiny SDXL on CPU, one
diffusion replica, batches of 8, adaptive quality off). Tenants: `vip` on plan `high`
(priority 2), `bulk` and `peer` on plan `low` (priority 0). Phases:
  unloaded   vip alone, 1 client;
  saturated  bulk with --bulk-clients clients (n=4 each), and after --settle-s vip and peer with
             1 client each.
The replica's max_ongoing_requests (--max-ongoing) is set above bulk's images in flight: work
beyond it waits in Serve's FIFO router queue, where priority can't apply (docs/priority-and-quality.md).
Writes benchmarks/results/<name>.json and .png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
from ray import serve

from benchmarks import local_app
from benchmarks.local_app import p95

RESULTS = Path(__file__).parent / "results"
PLANS = [{"name": "low", "priority": 0, **local_app.UNLIMITED}, {"name": "high", "priority": 2, **local_app.UNLIMITED}]
TENANTS = {"vip": "high", "bulk": "low", "peer": "low"}


class Clients:
    """Closed-loop clients of several tenants against one app, every request timed."""

    def __init__(self, app: local_app.LocalApp, body: dict) -> None:
        self.app = app
        self.body = body
        self.t0 = time.monotonic()
        self.samples: list[dict] = []

    async def loop(self, http: httpx.AsyncClient, tenant: str, phase: str, n: int, until: asyncio.Event) -> None:
        while not until.is_set():
            start = time.monotonic()
            r = await http.post("/v1/images/generations", json={**self.body, "n": n}, headers=self.app.auth(tenant))
            info = r.json().get("genserve", {}) if r.status_code == 200 else {}
            self.samples.append({"tenant": tenant, "phase": phase, "n": n, "status": r.status_code,
                                 "sent_t": round(start - self.t0, 3), "t": round(time.monotonic() - self.t0, 3),
                                 "latency_s": round(time.monotonic() - start, 4),
                                 "batch_sizes": info.get("batch_sizes", []), "compute_s": info.get("compute_s", [])})

    async def queue_depth(self, until: asyncio.Event, out: list[dict]) -> None:
        handle = serve.get_deployment_handle(f"Diffusion-{local_app.MODEL}", app_name=local_app.APP)
        while not until.is_set():
            s = await handle.stats.remote()
            out.append({"t": round(time.monotonic() - self.t0, 3), "queued": s["queued"], "running": s["running"]})
            await asyncio.sleep(0.5)


async def measure(app: local_app.LocalApp, a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    c = Clients(app, {"prompt": "a lighthouse at dusk", "size": a.size})
    depth: list[dict] = []
    async with httpx.AsyncClient(base_url=app.url, timeout=600) as http:
        warm = asyncio.Event()
        asyncio.get_running_loop().call_later(3.0, warm.set)
        await asyncio.gather(c.loop(http, "bulk", "warmup", 4, warm), c.loop(http, "vip", "warmup", a.vip_n, warm))

        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(a.unloaded_s, stop.set)
        await c.loop(http, "vip", "unloaded", a.vip_n, stop)

        stop_bulk, stop_probe = asyncio.Event(), asyncio.Event()
        bulk = [asyncio.ensure_future(c.loop(http, "bulk", "saturated", 4, stop_bulk)) for _ in range(a.bulk_clients)]
        sampler = asyncio.ensure_future(c.queue_depth(stop_bulk, depth))
        await asyncio.sleep(a.settle_s)  # the backlog builds up before the probes start
        asyncio.get_running_loop().call_later(a.saturated_s, stop_probe.set)
        await asyncio.gather(c.loop(http, "vip", "saturated", a.vip_n, stop_probe),
                             c.loop(http, "peer", "saturated", a.vip_n, stop_probe))
        stop_bulk.set()
        await asyncio.gather(*bulk, sampler)
    return c.samples, depth


def stats(xs: list[dict]) -> dict:
    ok = [s for s in xs if s["status"] == 200]
    lat = sorted(s["latency_s"] for s in ok)
    return {"requests": len(xs), "errors": len(xs) - len(ok), "p50_s": lat[len(lat) // 2] if lat else None,
            "p95_s": round(p95(lat), 4), "max_s": lat[-1] if lat else None}


def summarize(samples: list[dict], depth: list[dict], a: argparse.Namespace) -> dict:
    def pick(tenant: str, phase: str) -> list[dict]:
        return [s for s in samples if s["tenant"] == tenant and s["phase"] == phase]

    vip_unloaded, vip_sat, peer_sat = stats(pick("vip", "unloaded")), stats(pick("vip", "saturated")), \
        stats(pick("peer", "saturated"))
    # Low-tenant throughput over the window in which the probes ran (the saturated steady state).
    probes = pick("vip", "saturated") + pick("peer", "saturated")
    lo, hi = min(s["sent_t"] for s in probes), max(s["t"] for s in probes)
    bulk_done = [s for s in pick("bulk", "saturated") if lo <= s["t"] <= hi and s["status"] == 200]
    during = [d for d in depth if lo <= d["t"] <= hi]
    # Denoise+decode time of a full batch (the unit the high tenant's wait is bounded by: the batch
    # running when it arrives, then its own).
    full = [c for s in bulk_done for b, c in zip(s["batch_sizes"], s["compute_s"], strict=False) if b == 8]
    batch_s = sum(full) / len(full) if full else float("nan")
    return {
        "vip_unloaded": vip_unloaded, "vip_saturated": vip_sat, "peer_saturated": peer_sat,
        "bulk_saturated": {**stats(pick("bulk", "saturated")),
                           "images_per_s_while_probed": round(sum(s["n"] for s in bulk_done) / (hi - lo), 3)},
        "ratio_vip_saturated_over_unloaded_p95": round(vip_sat["p95_s"] / vip_unloaded["p95_s"], 2),
        "ratio_peer_saturated_over_vip_saturated_p95": round(peer_sat["p95_s"] / vip_sat["p95_s"], 2),
        "full_batch_compute_s": round(batch_s, 4),
        "vip_saturated_p95_in_full_batches": round(vip_sat["p95_s"] / batch_s, 2),
        "replica_queue_while_probed": {
            "samples": len(during), "mean_queued": round(sum(d["queued"] for d in during) / max(1, len(during)), 1),
            "fraction_with_full_batch_waiting": round(sum(d["queued"] >= 8 for d in during) / max(1, len(during)), 3)},
    }


def plot(samples: list[dict], depth: list[dict], path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (lat_ax, q_ax) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    styles = {"bulk": ("tab:gray", "bulk (low plan, many clients)"),
              "peer": ("tab:orange", "peer (low plan, 1 client)"),
              "vip": ("tab:blue", "vip (high plan, 1 client)")}
    for tenant, (color, label) in styles.items():
        xs = [s for s in samples if s["tenant"] == tenant and s["phase"] != "warmup"]
        lat_ax.scatter([s["t"] for s in xs], [s["latency_s"] for s in xs], s=8, color=color, label=label)
    lat_ax.set_ylabel("request latency (s)")
    lat_ax.legend(fontsize=8, loc="upper left")
    q_ax.plot([d["t"] for d in depth], [d["queued"] for d in depth], color="tab:gray")
    q_ax.axhline(8, color="red", linestyle="--", linewidth=1, label="one full batch")
    q_ax.set_ylabel("images queued on the replica")
    q_ax.set_xlabel("time (s)")
    q_ax.legend(fontsize=8)
    fig.suptitle("Plan priority under saturation (tiny SDXL, CPU)")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=local_app.default_models_dir())
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--vip-n", type=int, default=1, help="images per request of the high (and control) tenant")
    ap.add_argument("--bulk-clients", type=int, default=12, help="low-priority clients, 4 images per request")
    ap.add_argument("--max-ongoing", type=int, default=64, help="the diffusion replica's max_ongoing_requests")
    ap.add_argument("--unloaded-s", type=float, default=8.0)
    ap.add_argument("--settle-s", type=float, default=4.0)
    ap.add_argument("--saturated-s", type=float, default=30.0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="priority-tiny-cpu")
    a = ap.parse_args()
    model = {"default_steps": a.steps, "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02,
                                                    "priority_aging_s": 10}}
    started = time.monotonic()
    with local_app.serve_app(a.models, plans=PLANS, tenants=TENANTS, model=model,
                             max_ongoing_requests=a.max_ongoing) as app:
        samples, depth = asyncio.run(measure(app, a))
    result = {
        "benchmark": "priority", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": local_app.machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "plans": {p["name"]: p["priority"] for p in PLANS}, "tenants": TENANTS, "model": model,
        "wall_s": round(time.monotonic() - started, 1), "summary": summarize(samples, depth, a),
        "queue_depth": depth, "samples": samples,
    }
    s = result["summary"]
    print(json.dumps(s, indent=1))
    print(f"vip p95 unloaded {s['vip_unloaded']['p95_s']} s, saturated {s['vip_saturated']['p95_s']} s "
          f"(x{s['ratio_vip_saturated_over_unloaded_p95']}); peer (same plan as bulk) saturated "
          f"{s['peer_saturated']['p95_s']} s; bulk {s['bulk_saturated']['images_per_s_while_probed']} images/s")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{a.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot(samples, depth, out.with_suffix(".png"))
                            else ""))


if __name__ == "__main__":
    main()
