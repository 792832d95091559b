"""Zero-failure operations on a local cluster, under a steady load of image and chat requests:

  1. rollout: `serve deploy` of a changed config (new batch size, new ingress limits) mid-load;
  2. chaos: a diffusion replica and an ingress replica killed mid-load (plus async jobs in flight);
  3. overload: a burst far above capacity;
  4. node_loss: a whole Ray node killed (a local multi-node cluster: benchmarks/node_loss.py),
     with production's floors (two replicas of every deployment, one per node) and a
     replacement node joining; reports the time back to full capacity.

    python -m benchmarks.zero_failure [--seconds 8] [--clients 6] [--burst 300] [--phases rollout,node_loss]

Clients follow the documented retry policy (docs/operations.md): retry connection errors and
429/500/502/503/504, honouring `Retry-After` (capped at 2 s), up to 8 attempts. The script prints
the counts: failed requests after retries (expected 0), lost jobs (0), and for the burst the
status codes (429/503 with Retry-After, not timeouts) and replica memory before/after.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
# 500 included: genserve answers bad input with 4xx, so a 500 is a server-side failure (Serve's proxy
# answers a plain 500 when the replica holding the request dies) and safe to retry.
RETRY_STATUS = {429, 500, 502, 503, 504}
PHASES = ("rollout", "chaos", "overload", "node_loss")


class Load:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}
        self.ok = 0
        self.failed: list[str] = []
        self.retries = 0
        self.stop = False

    async def call(self, client: httpx.AsyncClient, path: str, body: dict) -> httpx.Response | None:
        for attempt in range(8):
            try:
                r = await client.post(path, json=body)
            except httpx.HTTPError as e:
                self.retries += 1
                await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
                last = f"{type(e).__name__}"
                continue
            if r.status_code in RETRY_STATUS:
                self.retries += 1
                await asyncio.sleep(min(2.0, float(r.headers.get("retry-after", 0.5))))
                last = str(r.status_code)
                continue
            return r
        self.failed.append(f"{path}: gave up after retries ({last})")
        return None

    async def client_loop(self, i: int) -> None:
        async with httpx.AsyncClient(base_url=self.url, headers=self.headers, timeout=60) as client:
            n = 0
            while not self.stop:
                n += 1
                if (i + n) % 3:
                    path, body = "/v1/images/generations", {"prompt": f"load {i}-{n}", "size": "32x32", "seed": n}
                else:
                    path, body = "/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 8,
                                                          "messages": [{"role": "user", "content": f"hi {n}"}]}
                r = await self.call(client, path, body)
                if r is None:
                    continue
                if r.status_code == 200:
                    self.ok += 1
                else:
                    self.failed.append(f"{path}: {r.status_code} {r.text[:120]}")


async def under_load(url: str, key: str, clients: int, seconds: float, action) -> dict:
    """Steady load for `seconds` with `action` run in the middle; the load's counts and the action's."""
    load = Load(url, key)
    tasks = [asyncio.create_task(load.client_loop(i)) for i in range(clients)]
    await asyncio.sleep(seconds / 2)
    t0 = time.monotonic()
    detail = await action()
    await asyncio.sleep(seconds / 2)
    load.stop = True
    await asyncio.gather(*tasks)
    return {"ok": load.ok, "failed": len(load.failed), "retries": load.retries, "failures": load.failed[:5],
            "action_s": round(time.monotonic() - t0, 1), **(detail or {})}


async def submit_jobs(url: str, key: str, n: int) -> list[str]:
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        return [(await c.post("/v1/jobs", json={"prompt": f"job {i}", "size": "32x32"})).json()["id"] for i in range(n)]


async def wait_jobs(url: str, key: str, jobs: list[str], timeout_s: float = 120) -> dict[str, int]:
    """Poll until every job is final; a job never final is lost."""
    deadline = time.monotonic() + timeout_s
    final: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}) as c:
        while len(final) < len(jobs) and time.monotonic() < deadline:
            for j in jobs:
                if j in final:
                    continue
                try:
                    r = await c.get(f"/v1/jobs/{j}")
                except httpx.HTTPError:
                    continue
                if r.status_code == 200 and r.json()["status"] in ("succeeded", "failed", "cancelled"):
                    final[j] = r.json()["status"]
            await asyncio.sleep(0.5)
    return {"jobs": len(jobs), "jobs_succeeded": list(final.values()).count("succeeded"),
            "jobs_lost": len(jobs) - len(final)}


def replica_rss_mib() -> float:
    out = subprocess.run(["ps", "-eo", "rss,args"], capture_output=True, text=True).stdout
    return round(sum(int(line.split()[0]) for line in out.splitlines()[1:] if "ServeReplica:zf" in line) / 1024, 1)


async def burst(url: str, key: str, n: int) -> dict:
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30,
                                 limits=limits) as client:
        async def one(i: int) -> str:
            try:
                r = await client.post("/v1/images/generations", json={"prompt": f"burst {i}", "size": "32x32"})
            except httpx.TimeoutException:
                return "timeout"
            except httpx.HTTPError as e:
                return type(e).__name__
            if r.status_code in (429, 503) and "retry-after" not in r.headers:
                return f"{r.status_code}-without-retry-after"
            return str(r.status_code)

        codes = await asyncio.gather(*(one(i) for i in range(n)))
    return dict(Counter(codes))


def base_doc(args: argparse.Namespace, work: Path) -> dict:
    doc = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    doc["applications"][0]["name"] = "zf"
    doc["http_options"]["port"] = args.port
    app = doc["applications"][0]
    app["args"]["work_dir"] = str(work)
    app["args"]["jobs"] = {"lease_s": 4, "heartbeat_s": 1, "reap_interval_s": 1, "retry_backoff_s": 0.2}
    for d in app["deployments"]:  # two ingress replicas, as in production
        if d["name"] == "Ingress":
            d["autoscaling_config"] = {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 64}
    return doc


async def run(args: argparse.Namespace) -> dict:
    report: dict = {}
    single = [p for p in args.phases if p != "node_loss"]
    if single:
        await run_single_node(args, single, report)
    if "node_loss" in args.phases:
        await run_node_loss(args, report)
    return report


async def run_node_loss(args: argparse.Namespace, report: dict) -> None:
    import ray
    from ray import serve

    from benchmarks import node_loss

    work = Path(tempfile.mkdtemp(prefix="gs-zf-nl-"))
    cluster, _ = node_loss.start(base_doc(args, work), work, num_cpus=3)
    try:
        key = (work / "local_api_key").read_text().strip()
        url = f"http://127.0.0.1:{args.port}"

        async def lose_a_node() -> dict:
            jobs = await submit_jobs(url, key, args.jobs)
            detail = await node_loss.lose_a_node(cluster, 3, args.replacement_delay)
            return {**detail, **await wait_jobs(url, key, jobs)}

        report["node_loss"] = await under_load(url, key, args.clients, args.seconds, lose_a_node)
        print("node_loss", report["node_loss"], flush=True)
    finally:
        try:
            serve.shutdown()
            ray.shutdown()
        finally:
            cluster.down()


async def run_single_node(args: argparse.Namespace, phases: list[str], report: dict) -> None:
    import ray
    from ray import serve

    from serve_app import launcher

    work = Path(tempfile.mkdtemp(prefix="gs-zf-"))
    doc = base_doc(args, work)
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    try:
        launcher.deploy(doc)
        launcher.wait_running("zf", timeout_s=300)
        key = (work / "local_api_key").read_text().strip()
        url = f"http://127.0.0.1:{args.port}"

        async def phase(name: str, action) -> None:
            report[name] = await under_load(url, key, args.clients, args.seconds, action)
            print(name, report[name], flush=True)

        async def rollout() -> dict:
            changed = copy.deepcopy(doc)
            a = changed["applications"][0]
            a["args"]["diffusion_models"][0]["batching"]["max_batch_size"] = 4  # user_config: in place
            for d in a["deployments"]:
                if d["name"] == "Ingress":
                    d["max_ongoing_requests"] = 200
            launcher.deploy(changed)
            await asyncio.to_thread(launcher.wait_running, "zf", 300)
            stats = await serve.get_deployment_handle("Diffusion-sdxl-tiny", app_name="zf").stats.remote()
            return {"new_max_batch_size": stats["max_batch_size"]}

        async def chaos() -> dict:
            jobs = await submit_jobs(url, key, args.jobs)
            killed = []
            for dep in ("Diffusion-sdxl-tiny", "Ingress"):
                name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["name"].startswith(f"SERVE_REPLICA::zf#{dep}#"))
                ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
                killed.append(dep)
            return {"killed": killed, **await wait_jobs(url, key, jobs)}

        async def overload() -> dict:
            before = replica_rss_mib()
            codes = await burst(url, key, args.burst)
            return {"burst": args.burst, "codes": codes, "replica_rss_mib_before": before,
                    "replica_rss_mib_after": replica_rss_mib()}

        actions = {"rollout": rollout, "chaos": chaos, "overload": overload}
        for name in phases:
            await phase(name, actions[name])
    finally:
        serve.shutdown()
        ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=8.0, help="steady load around each action")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=6)
    ap.add_argument("--burst", type=int, default=300)
    ap.add_argument("--port", type=int, default=8790)
    ap.add_argument("--phases", type=lambda s: [p for p in s.split(",") if p], default=list(PHASES),
                    help=f"comma-separated, run in this order: {','.join(PHASES)}")
    ap.add_argument("--replacement-delay", type=float, default=0.0,
                    help="node_loss: seconds before the replacement node joins (KubeRay's new pod)")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "zero_failure.json")
    a = ap.parse_args()
    unknown = set(a.phases) - set(PHASES)
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}; choose from {PHASES}")
    if "node_loss" in a.phases:
        # Ray 2.60's `ray start --head` turns token auth on; this driver joins by address and must
        # be told before Ray is imported (benchmarks/node_loss.py).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    report = asyncio.run(run(a))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2) + "\n")
    failed = sum(p["failed"] for p in report.values() if isinstance(p, dict) and "failed" in p)
    lost = sum(p.get("jobs_lost", 0) for p in report.values())
    print(json.dumps({"failed_requests": failed, "jobs_lost": lost,
                      "time_to_full_capacity_s": report.get("node_loss", {}).get("time_to_full_capacity_s")}))


if __name__ == "__main__":
    main()
