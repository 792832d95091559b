"""Where Serve puts fractional-GPU diffusion replicas: a throwaway cluster with fake GPUs on this machine.

    .venv/bin/python scripts/fake_gpu_placement.py --gpus 2 --replicas 5 --share 0.5

Starts its own Ray head (`ray start --head --num-gpus N`, own temp dir and ports: scripts/local_cluster.py),
deploys `DiffusionDeployment` of the tiny SDXL model with `num_gpus: share` and `replicas` replicas, waits until
as many as fit are RUNNING, and prints JSON: each running replica's reported assignment (node id,
GPU ids, share, CUDA_VISIBLE_DEVICES, device: `stats()["placement"]`) and how many replicas are
still waiting for a GPU. The cluster is ended before it returns. On CPU torch has no CUDA: the
replicas run on cpu while Ray still assigns them the fake GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_cluster import REPO, LocalCluster  # noqa: E402

DRIVER = r"""
import json, sys, time
import ray
from ray import serve
import ray._private.state

address, model, replicas, share, timeout_s = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
ray.init(address=address, logging_level="ERROR", log_to_driver=False)
from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.deployment import DiffusionDeployment

cfg = DiffusionModelConfig(name="tiny", family="sdxl", model=model, native_resolution=64, size_multiple=8,
                           min_side=32, max_side=128, default_steps=2, max_steps=8)
app = DiffusionDeployment.options(name="Diffusion-tiny", num_replicas=replicas,
                        ray_actor_options={"num_cpus": 0.1, "num_gpus": share}).bind(cfg)
serve.start(proxy_location="Disabled")  # handles only: no HTTP port to collide on
serve._run(app, name="placement", route_prefix=None, _blocking=False)   # a replica that can't be placed never runs
fits = int(sys.argv[6])
deadline = time.monotonic() + timeout_s
while True:
    st = serve.status().applications["placement"].deployments["Diffusion-tiny"]
    states = {str(k): v for k, v in st.replica_states.items()}
    if states.get("RUNNING", 0) >= fits or time.monotonic() > deadline:
        break
    time.sleep(2)
time.sleep(5)  # a replica that could be placed has had time to start; the rest should still wait
st = serve.status().applications["placement"].deployments["Diffusion-tiny"]
states = {str(k): v for k, v in st.replica_states.items()}
handle = serve.get_deployment_handle("Diffusion-tiny", app_name="placement")
seen = {}
for _ in range(200):  # the router picks replicas at random: ask until every running one answered
    s = handle.stats.remote().result()
    seen[s["placement"]["actor_id"]] = {**s["placement"], "device": s["device"], "memory_cap_share": s["gpu_share"]}
    if len(seen) >= states.get("RUNNING", 0):
        break
# The GCS's actor table (the state API would need the dashboard).
actors = [(a["ActorClassName"], a["State"]) for a in ray._private.state.actors().values()
          if "Diffusion-tiny" in a["ActorClassName"] and a["State"] != "DEAD"]
pending = [s for _, s in actors if s in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")]
print("RESULT " + json.dumps({"replica_states": states, "replicas": list(seen.values()),
                              "pending_actors": len(pending), "replica_actors": actors, "gpus_available": ray.available_resources().get("GPU", 0.0)}))
serve.shutdown()
"""


def run(*, gpus: int, replicas: int, share: float, timeout_s: float = 240) -> dict:
    model = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")) / "models" / "sdxl-tiny"
    if not (model / "model_index.json").exists():
        raise SystemExit(f"{model} missing: build it with `genserve models build-tiny`")
    fits = min(replicas, math.floor(gpus / share + 1e-9))
    with tempfile.TemporaryDirectory(prefix="gsfg", dir="/tmp") as tmp, \
            LocalCluster(tmp, head_cpus=2, head_gpus=gpus) as cluster:
        out = subprocess.run([sys.executable, "-c", DRIVER, cluster.address, str(model), str(replicas), str(share),
                              str(timeout_s), str(fits)],
                             env={**cluster.driver_env(), "HF_HUB_OFFLINE": "1"}, cwd=REPO, capture_output=True,
                             text=True, timeout=timeout_s + 180)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"driver failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
    return {**json.loads(lines[-1][len("RESULT "):]), "expected_running": fits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--replicas", type=int, default=5)
    ap.add_argument("--share", type=float, default=0.5)
    a = ap.parse_args()
    t0 = time.monotonic()
    print(json.dumps({**run(gpus=a.gpus, replicas=a.replicas, share=a.share),
                      "wall_s": round(time.monotonic() - t0, 1)}, indent=1))


if __name__ == "__main__":
    main()
