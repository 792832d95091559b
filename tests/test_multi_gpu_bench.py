"""benchmarks/multi_gpu.py's plumbing on CPU (fake GPUs, tiny models): the result JSON has the
machine, gpu_count, per-GPU-count points with a scaling efficiency, the tier CPU sampling, and the
LLM data-parallel levels with tokens/s and TTFT. No timings are asserted (speed is measured in
benchmarks, never in tests). Each test starts two local clusters (1 and 2 fake GPUs): 3-10 min on 2
shared cores, so they run only with GENSERVE_MULTI_GPU_BENCH_TEST=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.skipif(os.environ.get("GENSERVE_MULTI_GPU_BENCH_TEST") != "1",
                                                   reason="set GENSERVE_MULTI_GPU_BENCH_TEST=1 (3-10 min each)")]


def _run(tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(tmp_path))}
    cmd = [sys.executable, "-m", "benchmarks.multi_gpu", *args, "--tiny", "--out", str(tmp_path), "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads((tmp_path / "smoke.json").read_text())


def test_diffusion_scaling_plumbing(tmp_path: Path, tiny_models_dir: Path) -> None:
    res = _run(tmp_path, "diffusion", "--gpus", "1,2", "--images-per-gpu", "8", "--replica-cpus", "0.25",
               "--ingress", "1", "--concurrency", "8")
    assert res["gpu_count"] == 0 and res["machine"]["gpu"] == "cpu"  # fake GPUs: torch sees none
    assert res["machine"]["env"] == {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                                     "NVSHMEM_DISABLE_NVLS": "1"}
    (points,) = res["diffusion"]["shapes"].values()
    assert [(p["gpus"], p["replicas"]) for p in points] == [(1, 2), (2, 4)]  # two half-GPU replicas per GPU
    assert all(p["errors"] == 0 and p["images"] == 8 * p["gpus"] for p in points)
    assert points[0]["scaling_efficiency"] == 1.0 and points[1]["scaling_efficiency"] > 0
    assert points[1]["cpu_by_tier"]["diffusion"]["processes"] == 4
    assert {"proxy", "ingress"} <= set(points[1]["cpu_by_tier"])


def test_llm_data_parallel_plumbing(tmp_path: Path, tiny_models_dir: Path) -> None:
    res = _run(tmp_path, "llm-dp", "--gpus", "1,2", "--concurrency", "1,2", "--rounds", "1", "--max-tokens", "4",
               "--prompt-words", "8", "--ingress", "1")
    runs = res["llm-dp"]["runs"]
    assert [(r["replicas"], r["gpus"]) for r in runs] == [(1, 1), (2, 2)]
    for r in runs:
        assert [lv["concurrency"] for lv in r["levels"]] == [1, 2]
        assert all(lv["errors"] == 0 and lv["completion_tokens"] > 0 and lv["ttft_p50_s"] > 0 for lv in r["levels"])
    assert set(res["llm-dp"]["tokens_per_s_ratio"]["dp2_over_dp1"]) == {"1", "2"}
