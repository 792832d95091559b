"""benchmarks/lora_serving.py end to end on the tiny model on CPU (the GPU run is the lead's), and
benchmarks/lora_routing.py (Serve's multiplexed routing over replicas, its own local cluster)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_lora_serving_smoke(tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    cmd = [sys.executable, "-m", "benchmarks.lora_serving", "--tiny", "--device", "cpu", "--adapters", "4",
           "--slots", "2", "--requests", "16", "--concurrency", "8", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["no_lora"]["images_per_s"] > 0 and r["lora"]["images_per_s"] > 0 and r["throughput_ratio"] > 0
    # 2 slots for 4 Zipf-picked adapters: cold loads happened, and so did evictions.
    assert r["cold_load_ms"]["n"] >= 2 and r["cold_load_ms"]["p95"] > 0
    assert r["slot_loads"] >= 3 and r["slot_unloads"] >= 1 and sum(r["zipf_counts"].values()) == 16
    assert r["warm_switch_ms"]["n"] >= 1


def test_lora_serving_smoke_with_placeholder_slots(tmp_path: Path) -> None:
    """`--hotswap-rank`: placeholder slots and mixed-adapter batches, beside a replica without
    adapters (the numbers are the GPU run's; this checks the mode runs and reports)."""
    out = tmp_path / "lora.json"
    cmd = [sys.executable, "-m", "benchmarks.lora_serving", "--tiny", "--device", "cpu", "--adapters", "4",
           "--slots", "2", "--requests", "16", "--concurrency", "8", "--hotswap-rank", "4", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["mode"] == "placeholder slots, mixed batches" and r["settings"]["hotswap_rank"] == 4
    assert r["no_lora_plain"]["images_per_s"] > 0 and r["no_lora_plain_again"]["images_per_s"] > 0
    assert r["throughput_ratio"] > 0 and r["throughput_ratio_vs_slot_base"] > 0
    assert r["slot_loads"] >= 3 and r["slot_unloads"] >= 1  # 4 adapters through 2 slots
    # Adapter sets shared pipeline calls: fewer calls than images (groups split only by the 2 slots).
    assert r["lora"]["pipeline_calls"] < r["lora"]["images"] and r["lora"]["mean_group_size"] > 1
    bad = subprocess.run([*cmd[:-2], "--hotswap-rank", "2", "--out", str(out)], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "below the adapters' --rank 4" in bad.stderr


def test_lora_routing_smoke(tmp_path: Path) -> None:
    out = tmp_path / "routing.json"
    # One client: requests reach the replicas in the order sent, so one replica's hits must equal
    # an LRU of --slots simulated on the same sequence, exactly.
    cmd = [sys.executable, "-m", "benchmarks.lora_routing", "--replicas", "2,1", "--slots", "2", "--adapters", "4",
           "--requests", "16", "--concurrency", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(out.read_text())
    two, one = r["runs"]
    assert (two["replicas"], len(two["per_replica"]), one["replicas"], len(one["per_replica"])) == (2, 2, 1, 1)
    for run in (two, one):
        assert run["statuses"] == {"200": 16} and run["requests"] == 16
        for p in run["per_replica"]:
            # Counted by the replicas: every request a hit or a load, images match requests, and
            # Serve's LRU evicts exactly what exceeds the slots.
            assert p["hits"] + p["loads"] == p["requests"] == p["images_done"]
            assert p["evictions"] == max(0, p["loads"] - 2)
        assert run["loads"] >= r["compulsory_misses"]  # every adapter used was loaded somewhere
    assert one["hits"] == r["simulated_hits"]["lru_n_slots"]
    sim = r["simulated_hits"]
    assert sim["oracle_belady_2n_slots"] >= sim["lru_2n_slots"] >= sim["lru_n_slots"]
    assert sim["oracle_belady_2n_slots"] <= 16 - r["compulsory_misses"]
