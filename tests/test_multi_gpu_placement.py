"""Issue 24 on CPU: a separate local cluster with 2 fake GPUs (`ray start --head --num-gpus 2`, not the
session's shared cluster) places 4 half-GPU diffusion replicas of the tiny model, 2 per fake GPU, as
the replicas themselves report it, and a 5th waits for a GPU. ~1-3 min on 2 cores
(scripts/fake_gpu_placement.py does the work; run it by hand to see the JSON)."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fake_gpu_placement.py"


def _script():
    spec = importlib.util.spec_from_file_location("fake_gpu_placement", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_half_gpu_replicas_fill_two_fake_gpus_and_the_fifth_waits(tiny_models_dir: Path) -> None:
    res = _script().run(gpus=2, replicas=5, share=0.5)
    replicas = res["replicas"]
    assert res["replica_states"].get("RUNNING") == 4, res
    assert len(replicas) == 4, res
    # Two replicas per fake GPU, each told by Ray that it holds half of exactly that one card.
    assert Counter(tuple(r["gpu_ids"]) for r in replicas) == {("0",): 2, ("1",): 2}, replicas
    assert all(r["gpu_share"] == 0.5 for r in replicas), replicas
    # Ray set CUDA_VISIBLE_DEVICES to the assigned card; torch (CPU build) has no CUDA, so no GPU use.
    assert all(r["cuda_visible_devices"] == r["gpu_ids"][0] for r in replicas), replicas
    assert all(r["device"] == "cpu" and r["memory_cap_share"] is None for r in replicas), replicas
    assert len({r["node_id"] for r in replicas}) == 1 and len({r["actor_id"] for r in replicas}) == 4
    # The fifth replica exists but waits for a GPU: no GPU left, its actor not created.
    assert res["pending_actors"] == 1 and res["gpus_available"] == 0.0, res
    assert res["replica_states"].get("STARTING") == 1, res
