"""The benchmark suite runs end to end on the tiny CPU models and writes its JSON (no timings are
asserted: speed is measured in benchmarks, never in tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.ray


def test_serving_suite_smoke(tmp_path: Path, tiny_models_dir: Path) -> None:
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(tmp_path))}
    cmd = [sys.executable, "-m", "benchmarks.serving_suite", "--tiny", "--device", "cpu", "--phases", "raw,serve",
           "--batches", "1,4", "--raw-images", "8", "--serve-batch", "4", "--serve-images", "16",
           "--models", str(tiny_models_dir), "--out", str(tmp_path), "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    assert [c["batch"] for c in result["raw"]["curve"]] == [1, 4]
    graph = result["serve"]["graph"]
    assert graph["errors"] == 0 and graph["images"] == 16 and graph["max_batch"] <= 4
    assert result["serve"]["ratio_graph_over_raw"] > 0


def test_genserve_bench_closed_and_open_loop(genserve_url: str, api_key: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from serve_app.bench_cli import bench

    for extra in (["--requests", "6", "--concurrency", "3"], ["--rate", "4", "--duration", "1.5"]):
        result = CliRunner().invoke(bench, ["--url", genserve_url, "--api-key", api_key, "--size", "32x32",
                                            "--out", str(tmp_path), *extra])
        assert result.exit_code == 0, result.output
    runs = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("bench-*.json"))]
    assert sorted(r["mode"] for r in runs) == ["closed", "open"]
    assert all(r["errors"] == 0 and r["images"] > 0 for r in runs)


def test_genserve_bench_chat(genserve_url: str, api_key: str, tmp_path: Path) -> None:
    """Streamed chat through the running app: tokens/s from the answers' own usage, a TTFT per
    request, and a bad model counted as errors by status (not raised)."""
    from click.testing import CliRunner

    from serve_app.bench_cli import bench

    for model, out in (("chat", tmp_path / "ok"), ("no-such-model", tmp_path / "bad")):
        result = CliRunner().invoke(bench, ["--url", genserve_url, "--api-key", api_key, "--chat", "--model", model,
                                            "--max-tokens", "6", "--requests", "4", "--concurrency", "2",
                                            "--out", str(out)])
        assert result.exit_code == 0, result.output
    (ok,) = [json.loads(p.read_text()) for p in (tmp_path / "ok").glob("bench-chat-closed-*.json")]
    assert ok["errors"] == 0 and ok["requests"] == 4 and ok["completion_tokens"] > 0
    assert ok["tokens_per_s"] > 0 and 0 < ok["ttft_p50_s"] <= ok["p50_s"]
    assert next((tmp_path / "ok").glob("*.png")).stat().st_size > 0
    (bad,) = [json.loads(p.read_text()) for p in (tmp_path / "bad").glob("bench-chat-*.json")]
    assert bad["errors"] == 4 and bad["status_counts"] == {"404": 4}


def _run_benchmark(module: str, tmp_path: Path, *args: str) -> dict:
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(tmp_path))}
    cmd = [sys.executable, "-m", module, "--out", str(tmp_path), "--name", "smoke", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "smoke.png").exists()
    return json.loads((tmp_path / "smoke.json").read_text())


def test_adaptive_quality_benchmark_smoke(tmp_path: Path, tiny_models_dir: Path) -> None:
    """Both sides in one run: the fixed plan always runs full steps; the auto plan degrades
    within [min_steps, steps] under the load step (6 clients x 4 images = 3 batches queued)."""
    result = _run_benchmark("benchmarks.adaptive_quality", tmp_path, "--models", str(tiny_models_dir),
                            "--calm-s", "1", "--load-s", "4", "--clients", "6", "--hold-s", "1",
                            "--steady-after-s", "1")
    fixed, auto = result["summary"]["fixed"], result["summary"]["auto"]
    assert all(ph["errors"] == 0 for side in (fixed, auto) for ph in side.values())
    assert fixed["load"]["steps_min"] == fixed["load"]["steps_max"] == 16 and fixed["load"]["degraded_requests"] == 0
    assert auto["load"]["degraded_requests"] > 0 and auto["load"]["steps_min"] == 4
    assert auto["load"]["steps_within_bounds"] and "p95_under_target" in auto["load"]
    assert {r["clients"] for r in result["timeline"]["auto"]} == {1, 6}


def test_priority_benchmark_smoke(tmp_path: Path, tiny_models_dir: Path) -> None:
    result = _run_benchmark("benchmarks.priority", tmp_path, "--models", str(tiny_models_dir), "--bulk-clients", "4",
                            "--unloaded-s", "2", "--settle-s", "1", "--saturated-s", "3")
    s = result["summary"]
    assert all(s[k]["errors"] == 0 for k in ("vip_unloaded", "vip_saturated", "peer_saturated", "bulk_saturated"))
    assert s["bulk_saturated"]["images_per_s_while_probed"] > 0  # the low plan keeps progressing
    assert s["ratio_vip_saturated_over_unloaded_p95"] > 0


def test_serving_suite_curve_memory_wuerstchen_smoke(tmp_path: Path, tiny_models_dir: Path) -> None:
    """The GPU-only phases run on the tiny CPU models: the curve through the graph changes
    max_batch_size in place and refuses an image above the budget with 422."""
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(tmp_path))}
    cmd = [sys.executable, "-m", "benchmarks.serving_suite", "--tiny", "--device", "cpu",
           "--phases", "curve,memory,wuerstchen", "--batches", "1,2", "--curve-images", "4",
           "--wuerstchen-batches", "1", "--wuerstchen-reps", "1", "--memory-reps", "1",
           "--models", str(tiny_models_dir), "--out", str(tmp_path), "--name", "smoke"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "smoke.json").read_text())
    points = result["curve"]["points"]
    assert [p["max_batch_size"] for p in points] == [1, 2] and all(p["errors"] == 0 for p in points)
    assert max(p["max_batch"] for p in points) == 2  # the reconfigured batch size took effect
    assert result["curve"]["oversize"][0]["status"] == 422
    assert result["curve"]["oversize"][0]["code"] == "exceeds_memory_budget"
    assert {r["vae_slicing"] for r in result["memory"]["rows"]} == {False, True}
    assert result["wuerstchen"]["rows"][0]["images_per_s"] > 0


def test_llm_benchmarks_smoke(tmp_path: Path) -> None:
    """The engine's two schedulers side by side, and the LLM through Serve vs the engine (own
    cluster), on the tiny model: both write their JSON with every side measured."""
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", str(tmp_path))}
    cmd = [sys.executable, "-m", "benchmarks.llm_schedulers", "--concurrency", "1,2", "--requests", "2",
           "--rounds", "1", "--max-tokens", "12", "--out", str(tmp_path / "sched.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sched = json.loads((tmp_path / "sched.json").read_text())
    assert [r["concurrency"] for r in sched["runs"]] == [1, 2]
    assert all(r["tokens_per_s"]["continuous"] > 0 and r["tokens_per_s"]["static"] > 0 for r in sched["runs"])
    assert (tmp_path / "sched.png").stat().st_size > 0

    cmd = [sys.executable, "-m", "benchmarks.llm_overhead", "--concurrency", "1", "--requests", "2", "--rounds", "2",
           "--max-tokens", "8", "--port", "8799", "--out", str(tmp_path / "llm.json")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads((tmp_path / "llm.json").read_text())["runs"]
    assert len(run["direct"]["rounds"]) == len(run["serve"]["rounds"]) == 2
    assert run["serve"]["requests"] == 4 and run["serve_vs_direct"]["tokens_per_s_ratio"] > 0
    assert set(run["serve"]["server_timing_ms_p50"]) == {"auth", "admit", "llm", "app"}
    assert (tmp_path / "llm.png").stat().st_size > 0


def test_admission_benchmark_smoke(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.admission", "--n", "20", "--out", str(tmp_path / "adm.json")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "adm.json").read_text())
    assert result["dialect"] == "sqlite" and result["admit_p50_ms"] > 0 and result["settle_p50_ms"] > 0
    assert all(r["built_us"] > 0 and r["prebuilt_us"] > 0 for r in result["upsert_per_execution"])


def test_engine_speed_smoke(tmp_path: Path) -> None:
    """benchmarks/engine_speed.py end to end on the tiny model, eager (compiling is for the GPU):
    a variant with the draft tier, draft rows with fidelity, and the fresh-process start."""
    out = tmp_path / "es.json"
    cmd = [sys.executable, "-m", "benchmarks.engine_speed", "--tiny", "--device", "cpu", "--steps", "3",
           "--reps", "1", "--variants", '[{"channels_last": true, "draft": {"cache_interval": 2}}]',
           "--draft", "2", "--warm-start", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["eager"]["images_per_s"] > 0
    (variant,) = result["variants"]
    assert variant["fidelity_vs_eager"]["psnr_db_min"] >= 40  # channels-last is lossless
    (draft,) = result["draft"]["rows"]
    assert draft["unet_calls"]["reused"] > 0 and draft["fidelity_vs_default"]["max_abs_diff"] > 0
    assert "error" not in result["warm_start"] and result["warm_start"]["start_to_first_image_s"] > 0


def test_img2img_speed_smoke(tmp_path: Path) -> None:
    """benchmarks/img2img_speed.py end to end on the tiny model: every mode timed in one run,
    the img2img step count from strength, and the ratios against txt2img."""
    out = tmp_path / "i2i.json"
    cmd = [sys.executable, "-m", "benchmarks.img2img_speed", "--tiny", "--device", "cpu", "--steps", "2",
           "--strength", "0.5", "--batches", "2", "--reps", "1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["steps_run"] == {"txt2img": 2, "img2img": 1, "inpaint": 1}
    (row,) = result["rows"]
    assert row["batch"] == 2 and all(row[m]["images_per_s"] > 0 for m in ("txt2img", "img2img", "inpaint"))
    assert row["img2img_vs_txt2img"] > 0 and row["inpaint_vs_txt2img"] > 0
