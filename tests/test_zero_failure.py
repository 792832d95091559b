"""The zero-failure operations script (benchmarks/zero_failure.py), smaller: a rollout, killed
replicas and an overload burst under steady load lose no request that follows the documented
retry policy, and no job; overload answers 429/503 with Retry-After, not timeouts."""

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
           "--burst", "150", "--port", str(free_port()), "--out", str(out)]
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
