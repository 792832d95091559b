"""`benchmarks.llm_lora --tiny` end to end on CPU (the tiny model, transformers engine): the result's
shape and that every phase produced all its tokens; never timings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_llm_lora_benchmark_tiny(tmp_path: Path, tiny_models_dir: Path) -> None:
    pytest.importorskip("peft")
    out = tmp_path / "llm_lora.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "benchmarks.llm_lora", "--tiny", "--out", str(out)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = {p["phase"]: p for p in result["phases"]}
    assert set(phases) == {"base", "lora", "plain"}
    for p in phases.values():
        assert p["output_tokens"] == p["requests"] * result["max_tokens"]  # ignore_eos: every token came
    assert result["engine"] == "transformers" and result["adapters"] == 6
    # Zipf over 6: several adapters used, each loaded once (cold), none evicted (room for all).
    assert result["adapter_loads"] == result["distinct_adapters_used"] > 1
    assert phases["lora"]["cold_requests"] >= result["adapter_loads"]  # concurrent first requests may share a load
    assert result["adapter_load_p95_s"] > 0 and result["ratio_lora_vs_base"] > 0
    assert json.loads(run.stdout.strip().splitlines()[-1])["ratio_lora_vs_plain"] == result["ratio_lora_vs_plain"]
    # The mixed-batch check (what the CUDA run reports for vLLM): greedy base rows unchanged by adapter
    # rows beside them, adapter rows changed by their adapter.
    mixed = result["mixed_batch_check"]
    assert mixed["base_deterministic"] is True
    assert mixed["base_rows_equal_in_mixed_batch"] == [True, True]
    assert mixed["adapter_rows_differ_from_base"] == [True, True]
