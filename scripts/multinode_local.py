"""Multi-node genserve on one machine: `ray start --head` + `ray start --address` (a second raylet, with
its own fake GPU), the app deployed with `serve deploy` (tiny models, one proxy per node:
`proxy_location: EveryNode`), replicas on both nodes, and requests that succeed through both proxies.

    .venv/bin/python scripts/multinode_local.py [--nodes 2] [--requests 16] [--keep]

Prints a JSON report (nodes, where each deployment's replicas and the proxies run, requests served
by each proxy) and exits non-zero if a check fails. The cluster is ended on exit unless --keep (then
it prints how to reach it; end it with the pids it prints: never `ray stop`, which would end every
Ray process on the machine).

Both proxies bind the same host:port (Ray Serve sets SO_REUSEPORT, as two nodes on one machine
need); the kernel spreads new connections over them. Each request here opens its own connection,
and each proxy's own log (logs/serve/proxy_*.log of the node that runs it) counts the requests
it served.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_cluster import REPO, SERVE, LocalCluster, free_port  # noqa: E402

APP = "genserve"
PLACEMENT = r"""
import json, sys, ray, ray._private.state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
actors = [a for a in ray._private.state.actors().values() if a["State"] == "ALIVE"]
print("RESULT " + json.dumps({
    "nodes": sorted(n["NodeID"] for n in ray.nodes() if n["Alive"]),
    "actors": [{"class": a["ActorClassName"], "node_id": a["Address"]["NodeID"], "pid": a.get("Pid")} for a in actors],
}))
"""


def serve_config(work: Path, port: int, models: Path, nodes: int) -> dict:
    """A small Serve config: the tiny SDXL and chat models, each deployment with one replica per node."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": APP, "route_prefix": "/", "import_path": "serve_app.graph:build_app",
            "args": {
                "work_dir": str(work),
                "diffusion_models": [{
                    "name": "sdxl-tiny", "family": "sdxl", "model": str(models / "sdxl-tiny"), "native_resolution": 64,
                    "size_multiple": 8, "min_side": 32, "max_side": 128, "default_steps": 2, "max_steps": 8,
                    "batching": {"max_batch_size": 4, "batch_wait_timeout_s": 0.02}}],
                "llm_models": [{"name": "tiny-chat", "model": str(models / "llm-tiny"), "engine": "transformers",
                                "dtype": "float32", "max_model_len": 512, "default_max_tokens": 8}],
            },
            "deployments": [
                # One ingress per node (as configs/serve.yaml: losing a node loses one ingress).
                {"name": "Ingress", "num_replicas": nodes, "max_replicas_per_node": 1,
                 "ray_actor_options": {"num_cpus": 0.25}},
                # One fake GPU per node and a whole one per replica: one replica on each node.
                {"name": "Diffusion-sdxl-tiny", "num_replicas": nodes, "max_ongoing_requests": 16,
                 "ray_actor_options": {"num_cpus": 0.25, "num_gpus": 1}},
                {"name": "LLM-tiny-chat", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.25}},
            ],
        }],
    }


def _wait_running(cluster: LocalCluster, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    status = ""
    while time.monotonic() < deadline:
        out = subprocess.run([SERVE, "status", "-a", cluster.dashboard_url], env=cluster.driver_env(),
                             capture_output=True, text=True, timeout=120)
        status = out.stdout
        if out.returncode == 0:
            app = (yaml.safe_load(status) or {}).get("applications", {}).get(APP, {})
            if app.get("status") == "RUNNING":
                return
            if app.get("status") == "DEPLOY_FAILED":
                break
        time.sleep(3)
    raise TimeoutError(f"{APP} not RUNNING after {timeout_s}s:\n{status[-4000:]}")


def _proxy_request_counts(cluster: LocalCluster) -> dict[str, int]:
    """Requests each proxy served, from its own log: {log file name: count}."""
    counts: dict[str, int] = {}
    for log in cluster.temp_dir.glob("**/session_2*/logs/serve/proxy_*.log"):  # a temp dir per node
        counts[str(log.relative_to(cluster.temp_dir))] = len(re.findall(r"POST /v1/(?:images/generations|chat/completions) 200", log.read_text()))
    return counts


def run(*, nodes: int = 2, requests: int = 16, keep: bool = False, timeout_s: float = 600) -> dict:
    models = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")) / "models"
    if not (models / "sdxl-tiny" / "model_index.json").exists() or not (models / "llm-tiny").exists():
        raise SystemExit(f"tiny models missing under {models}: `genserve models build-tiny`")
    tmp = Path(tempfile.mkdtemp(prefix="gsmn", dir="/tmp"))
    cluster = LocalCluster(tmp / "ray", head_cpus=2, head_gpus=1, dashboard=True,
                           env={"HF_HUB_OFFLINE": "1", "GENSERVE_WORK": str(models.parent)})
    report: dict = {}
    try:
        t0 = time.monotonic()
        cluster.start()
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=2, num_gpus=1)
        report["cluster_up_s"] = round(time.monotonic() - t0, 1)
        port = free_port()
        cfg_path = tmp / "serve.yaml"
        cfg_path.write_text(yaml.safe_dump(serve_config(tmp / "work", port, models, nodes)))
        out = subprocess.run([SERVE, "deploy", str(cfg_path), "-a", cluster.dashboard_url], env=cluster.driver_env(),
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"serve deploy failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        _wait_running(cluster, timeout_s)
        report["deploy_to_running_s"] = round(time.monotonic() - t0 - report["cluster_up_s"], 1)

        key = (tmp / "work" / "local_api_key").read_text().strip()
        headers = {"Authorization": f"Bearer {key}"}
        url = f"http://127.0.0.1:{port}"
        statuses: Counter = Counter()
        for i in range(requests):
            # A new connection per request (the kernel picks a proxy per connection).
            with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
                if i % 4 == 3:
                    r = client.post("/v1/chat/completions", json={
                        "model": "tiny-chat", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 4})
                    ok = r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
                else:
                    r = client.post("/v1/images/generations", json={
                        "prompt": f"node test {i}", "model": "sdxl-tiny", "size": "64x64", "steps": 2})
                    ok = r.status_code == 200 and len(r.json()["data"]) == 1
            statuses[f"{r.status_code}{'' if ok else ' (bad body)'}"] += 1
        report["responses"] = dict(statuses)

        out = subprocess.run([sys.executable, "-c", PLACEMENT, cluster.address], env=cluster.driver_env(),
                             capture_output=True, text=True, timeout=180)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"placement query failed:\n{out.stderr[-3000:]}")
        placed = json.loads(lines[-1][len("RESULT "):])
        report["nodes"] = placed["nodes"]
        by_class: dict[str, list[str]] = {}
        for a in placed["actors"]:
            name = a["class"].split(":")[-1] if a["class"].startswith("ServeReplica:") else a["class"]
            by_class.setdefault(name, []).append(a["node_id"])
        report["nodes_of"] = {k: sorted(v) for k, v in sorted(by_class.items())
                              if k in ("ProxyActor", "Ingress", "Diffusion-sdxl-tiny", "LLM-tiny-chat")}
        time.sleep(2)  # proxies flush their logs
        report["proxy_requests"] = _proxy_request_counts(cluster)
        report["checks"] = checks(report, nodes=nodes, requests=requests)
        if keep:
            report["kept"] = {"serve_url": url, "dashboard": cluster.dashboard_url, "address": cluster.address,
                              "api_key_file": str(tmp / "work" / "local_api_key"),
                              "end_with": f"kill {' '.join(str(p) for p in cluster.leftover_pids())}"}
        return report
    finally:
        if not keep:
            cluster.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def checks(report: dict, *, nodes: int, requests: int) -> dict[str, bool]:
    every = set(report["nodes"])
    per_node = report["nodes_of"]
    served = [n for n in report["proxy_requests"].values() if n > 0]
    return {
        "all_nodes_alive": len(every) == nodes,
        "one_proxy_per_node": sorted(per_node.get("ProxyActor", [])) == sorted(every),
        "ingress_on_every_node": set(per_node.get("Ingress", [])) == every,
        "diffusion_on_every_node": set(per_node.get("Diffusion-sdxl-tiny", [])) == every,
        "all_requests_ok": report["responses"] == {"200": requests},
        "every_proxy_served": len(served) == nodes and sum(served) == requests,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--keep", action="store_true", help="leave the cluster running")
    a = ap.parse_args()
    report = run(nodes=a.nodes, requests=a.requests, keep=a.keep)
    print(json.dumps(report, indent=1))
    sys.exit(0 if all(report["checks"].values()) else 1)


if __name__ == "__main__":
    main()
