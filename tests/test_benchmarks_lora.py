"""benchmarks/lora_serving.py end to end on the tiny model on CPU (the GPU run is the lead's)."""

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
