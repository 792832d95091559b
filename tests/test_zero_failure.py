"""The zero-failure operations script (benchmarks/zero_failure.py), smaller: a rollout, killed
replicas, an overload burst and a whole node killed under steady load lose no request that follows
the documented retry policy, and no job; overload answers 429/503 with Retry-After, not timeouts;
after the node loss every deployment is back at two replicas on two live nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import free_port

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray


def test_rollout_chaos_and_overload_lose_nothing(tmp_path: Path, tiny_models_dir: Path) -> None:
    out = tmp_path / "zero_failure.json"
    cmd = [sys.executable, "-m", "benchmarks.zero_failure", "--seconds", "4", "--clients", "4", "--jobs", "4",
           "--burst", "150", "--port", str(free_port()), "--out", str(out), "--phases", "rollout,chaos,overload"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for phase in ("rollout", "chaos", "overload"):
        assert report[phase]["failed"] == 0, report[phase]
        assert report[phase]["ok"] > 0
    assert report["rollout"]["new_max_batch_size"] == 4  # the changed config reached the replicas
    assert report["chaos"]["jobs_lost"] == 0 and report["chaos"]["jobs_succeeded"] == report["chaos"]["jobs"]
    codes = report["overload"]["codes"]
    assert set(codes) <= {"200", "429", "503"}, codes  # no timeouts, no 429/503 without Retry-After


def test_node_loss_loses_nothing(tmp_path: Path, tiny_models_dir: Path) -> None:
    """A local multi-node cluster (`ray start --head` + 2 x `ray start --address`) at production's
    floors (two replicas of each deployment, one per node); one worker node is SIGKILLed mid-load and
    a replacement joins."""
    out = tmp_path / "zero_failure.json"
    cmd = [sys.executable, "-m", "benchmarks.zero_failure", "--phases", "node_loss", "--seconds", "6",
           "--clients", "3", "--jobs", "3", "--port", str(free_port()), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ), capture_output=True, text=True, timeout=1200)
    # Ray's own logs fill the output: show the driver's lines (the report, a traceback) first.
    mine = [line for line in (proc.stdout + proc.stderr).splitlines()
            if not line.startswith((" ", "\t", "[", "\x1b")) and "(raylet)" not in line]
    assert proc.returncode == 0, "\n".join(mine[-60:])
    r = json.loads(out.read_text())["node_loss"]
    assert r["failed"] == 0 and r["ok"] > 0, r
    assert r["jobs_lost"] == 0 and r["jobs_succeeded"] == r["jobs"], r
    # Before: every deployment on nodes a and b. The kill took one replica of each.
    assert all(nodes == ["a", "b"] for nodes in r["replicas_before"].values()), r["replicas_before"]
    assert all(n == 1 for n in r["replicas_lost"].values()) and len(r["replicas_lost"]) == 3, r["replicas_lost"]
    # Serve saw the loss and came back to full capacity: two replicas each, on a and the new node c.
    assert r["loss_seen_by_serve_s"] is not None and r["time_to_full_capacity_s"] is not None, r
    assert all(nodes == ["a", "c"] for nodes in r["replicas_after"].values()), r["replicas_after"]
