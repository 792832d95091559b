"""Hit rate of Serve's multiplexed routing for LoRA adapter sets (issue 21), 2 diffusion replicas
vs 1, on the real application over HTTP.

    python -m benchmarks.lora_routing [--replicas 2,1 --slots 4 --adapters 12 --requests 240]

For each replica count: a private local Ray cluster and the whole app (benchmarks/local_app.py:
tiny SDXL on CPU, `lora.max_adapters_per_replica` = --slots), --adapters tiny random adapters
uploaded through `POST /v1/adapters`, then --requests image requests, each naming one adapter
drawn from the same Zipf as benchmarks/lora_serving.py (same seed: every run sends the same
sequence), at --concurrency clients. The ingress sets the multiplexed model id; Serve's router
sends a request to a replica that reports holding that set, else to one holding the fewest.

Counted by the replicas themselves (the diffusion deployment's `stats`, one answer per replica):
requests that named an adapter set, sets Serve's multiplexed LRU had to load (a miss: the
replica did not hold the set; concurrent requests for a set being loaded wait for that one load)
and sets it evicted. hit rate = (requests - loads) / requests.

For context, computed on the same sequence (no Serve): LRU with --slots (one replica), LRU with
2 x --slots (one pooled cache), and the oracle: Belady's optimal eviction with 2 x --slots, the
most hits any placement and eviction of 2 replicas' slots could get.

Routing does not depend on the GPU: this runs on CPU with tiny models. The order requests reach
replicas depends on timing (concurrency, when replicas report their sets), so the measured rate
varies a little between runs; the simulations do not.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import time
import zipfile
from collections import OrderedDict, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from benchmarks import local_app

RESULTS = Path(__file__).parent / "results"
PLANS = [{"name": "bench", **local_app.UNLIMITED, "max_adapters": None}]
TENANT = "bench"
PROMPT = "a lighthouse on a cliff at dusk"


def zipf_picks(ids: list[str], n: int, s: float, seed: int) -> list[str]:
    from benchmarks.lora_serving import zipf_picks as picks  # the same Zipf as the serving benchmark

    return picks(ids, n, s, seed)


def adapter_zips(n: int, rank: int) -> dict[str, bytes]:
    """n tiny random PEFT LoRAs on the tiny SDXL UNet (deployments/diffusion/tiny.py), zipped."""
    from safetensors.torch import save as st_save

    from deployments.diffusion.tiny import tiny_sdxl_lora, tiny_sdxl_pipeline

    unet = tiny_sdxl_pipeline().unet
    out = {}
    for i in range(n):
        cfg, weights = tiny_sdxl_lora(seed=100 + i, rank=rank, unet=unet)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("adapter_config.json", json.dumps(cfg))
            zf.writestr("adapter_model.safetensors", st_save(weights))
        out[f"route{i:02d}"] = buf.getvalue()
    return out


# ---- the same sequence through caches, no Serve ---------------------------------------------

def lru_hits(seq: list[str], slots: int) -> int:
    cache: OrderedDict[str, None] = OrderedDict()
    hits = 0
    for x in seq:
        if x in cache:
            hits += 1
            cache.move_to_end(x)
            continue
        if len(cache) >= slots:
            cache.popitem(last=False)
        cache[x] = None
    return hits


def belady_hits(seq: list[str], slots: int) -> int:
    """Optimal offline eviction (evict the set whose next use is farthest away)."""
    nxt: list[float] = [0.0] * len(seq)
    seen: dict[str, float] = {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = seen.get(seq[i], float("inf"))
        seen[seq[i]] = i
    cache: dict[str, float] = {}  # item -> its next use
    hits = 0
    for i, x in enumerate(seq):
        if x in cache:
            hits += 1
        elif len(cache) >= slots:
            del cache[max(cache, key=lambda k: cache[k])]
        cache[x] = nxt[i]
    return hits


# ---- one run against the app ----------------------------------------------------------------

async def send(app: local_app.LocalApp, picks: list[str], a: argparse.Namespace) -> dict[str, Any]:
    statuses: dict[int, int] = defaultdict(int)
    sem = asyncio.Semaphore(a.concurrency)

    async def one(http: httpx.AsyncClient, i: int, name: str) -> None:
        async with sem:
            r = await http.post("/v1/images/generations", headers=app.auth(TENANT), json={
                "prompt": PROMPT, "seed": i, "size": a.size, "steps": a.steps, "response_format": "b64_json",
                "loras": [{"name": name, "weight": 1.0}]})
            statuses[r.status_code] += 1

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=app.url, timeout=600) as http:
        await asyncio.gather(*(one(http, i, name) for i, name in enumerate(picks)))
    return {"wall_s": round(time.monotonic() - t0, 2), "statuses": dict(statuses)}


def replica_stats(replicas: int, tries: int = 200) -> list[dict[str, Any]]:
    """One `stats` answer per replica: the handle picks a replica per call, so call until each
    has answered."""
    from ray import serve

    handle = serve.get_deployment_handle(f"Diffusion-{local_app.MODEL}", app_name=local_app.APP)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(tries):
        s = handle.stats.remote().result()
        seen[s["replica"]] = s
        if len(seen) == replicas:
            break
    if len(seen) != replicas:
        raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered stats in {tries} calls")
    return list(seen.values())


def run_one(a: argparse.Namespace, replicas: int, zips: dict[str, bytes], picks: list[str]) -> dict[str, Any]:
    model = {"default_steps": a.steps, "lora": {"max_adapters_per_replica": a.slots},
             "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.01}}
    started = time.monotonic()
    with local_app.serve_app(a.models, plans=PLANS, tenants={TENANT: "bench"}, model=model,
                             replicas=replicas) as app:
        for name, data in zips.items():
            r = httpx.post(app.url + "/v1/adapters", headers=app.auth(TENANT), timeout=120,
                           data={"name": name, "base_model": local_app.MODEL},
                           files={"file": (f"{name}.zip", data, "application/zip")})
            if r.status_code != 201:
                raise RuntimeError(f"upload {name}: {r.status_code} {r.text}")
        traffic = asyncio.run(send(app, picks, a))
        stats = replica_stats(replicas)
    per = [{"requests": s["lora_set_requests"], "loads": s["lora_sets_staged"],
            "evictions": s["lora_sets_released"], "hits": s["lora_set_requests"] - s["lora_sets_staged"],
            "slot_loads": s["lora_loads"], "images_done": s["images_done"]} for s in stats]
    per.sort(key=lambda p: -p["requests"])
    total = {k: sum(p[k] for p in per) for k in ("requests", "loads", "evictions", "hits")}
    return {"replicas": replicas, **traffic, "per_replica": per, **total,
            "hit_rate": round(total["hits"] / max(1, total["requests"]), 4),
            "run_s": round(time.monotonic() - started, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=local_app.default_models_dir())
    ap.add_argument("--replicas", default="2,1", help="replica counts, one app each, in this order")
    ap.add_argument("--slots", type=int, default=4, help="lora.max_adapters_per_replica (N)")
    ap.add_argument("--adapters", type=int, default=12, help="distinct adapters (M)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--size", default="32x32")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "lora_routing-tiny-cpu.json")
    a = ap.parse_args()
    zips = adapter_zips(a.adapters, a.rank)
    # The registry names each set by its id; the Zipf is over names (rank 1 = route00), same ranks.
    picks = zipf_picks(sorted(zips), a.requests, a.zipf_s, seed=a.seed)
    runs = [run_one(a, int(r), zips, picks) for r in a.replicas.split(",")]
    n = len(picks)
    sim = {"lru_n_slots": lru_hits(picks, a.slots), "lru_2n_slots": lru_hits(picks, 2 * a.slots),
           "oracle_belady_2n_slots": belady_hits(picks, 2 * a.slots), "compulsory_misses": len(set(picks))}
    result = {
        "benchmark": "lora_routing", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": local_app.machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "zipf_counts": {k: picks.count(k) for k in sorted(zips)},
        "runs": runs,
        "simulated_hits": {k: v for k, v in sim.items() if k != "compulsory_misses"},
        "simulated_hit_rate": {k: round(v / n, 4) for k, v in sim.items() if k != "compulsory_misses"},
        "compulsory_misses": sim["compulsory_misses"],
        "ceiling_hit_rate": round(1 - sim["compulsory_misses"] / n, 4),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({"hit_rate": {r["replicas"]: r["hit_rate"] for r in runs},
                      "simulated": result["simulated_hit_rate"]}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
