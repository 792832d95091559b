"""Adaptive quality under a load step, with it off and on, in ONE run: offered load, steps used
and p95 latency over time, and the load phase's p95 of each side against a p95 target.

    python -m benchmarks.adaptive_quality [--clients 12 --load-s 20 --p95-target-s 4.0]

Starts its own local Ray cluster and app (benchmarks/local_app.py: tiny SDXL on CPU, one
diffusion replica, batches of 8, `--steps` default steps, adaptive quality enabled on the model
with `--min-steps` as its floor). Two tenants, same priority: `fixed` on a plan with
`adaptive_quality: false`, `auto` on one with `adaptive_quality: true`; requests send no
`quality`, so the plan decides. The same phases run for `fixed`, then for `auto`:
calm (1 client) -> load (--clients clients) -> after (1 client).

The p95 target is this script's argument (`--p95-target-s`): genserve's config has no latency
target; adaptive quality is driven by queue depth (`high_water`/`low_water`). Writes
benchmarks/results/<name>.json and .png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks import local_app
from benchmarks.local_app import p95

RESULTS = Path(__file__).parent / "results"
SIDES = ("fixed", "auto")


def plans() -> list[dict]:
    return [{"name": f"{side}-plan", "priority": 0, "adaptive_quality": side == "auto", **local_app.UNLIMITED}
            for side in SIDES]


def model_entry(a: argparse.Namespace) -> dict:
    return {"default_steps": a.steps, "max_steps": max(a.steps, 50),
            "batching": {"max_batch_size": 8, "batch_wait_timeout_s": 0.02},
            "adaptive_quality": {"enabled": True, "high_water": 1.5, "low_water": 0.5, "hold_s": a.hold_s,
                                 "min_steps_fraction": a.min_steps / a.steps, "min_steps": a.min_steps}}


async def run_side(app: local_app.LocalApp, side: str, a: argparse.Namespace,
                   phases: list[tuple[str, int, float]]) -> tuple[list[dict], list[dict]]:
    """(one sample per finished request, the phases' time windows); a sample's `phase` is the
    phase in which it was sent. A phase ends when its window closed and its clients' last
    requests came back."""
    samples: list[dict] = []
    windows: list[dict] = []
    t0 = time.monotonic()
    body = {"prompt": "a lighthouse at dusk", "size": a.size, "n": a.n}
    async with httpx.AsyncClient(base_url=app.url, headers=app.auth(side), timeout=600) as http:
        for phase, clients, seconds in phases:
            start = time.monotonic()
            windows.append({"phase": phase, "clients": clients, "start_t": round(start - t0, 3),
                            "end_t": round(start + seconds - t0, 3)})
            end = start + seconds

            async def client() -> None:
                while time.monotonic() < end:
                    start = time.monotonic()
                    r = await http.post("/v1/images/generations", json=body)
                    info = r.json().get("genserve", {}) if r.status_code == 200 else {}
                    samples.append({"side": side, "t": round(time.monotonic() - t0, 3), "sent_t": round(start - t0, 3),
                                    "phase": phase, "clients": clients, "status": r.status_code,
                                    "latency_s": round(time.monotonic() - start, 4),
                                    "steps_used": info.get("steps_used", []), "degraded": bool(info.get("degraded"))})

            await asyncio.gather(*(client() for _ in range(clients)))
            windows[-1]["drained_t"] = round(time.monotonic() - t0, 3)  # its clients' last answers came back
    return samples, windows


def clients_at(windows: list[dict], t: float) -> int:
    """Clients sending at time t (the offered load; during a phase's drain, the phase's)."""
    return next((w["clients"] for w in windows if w["start_t"] <= t < w["drained_t"]), windows[-1]["clients"])


def timeline(samples: list[dict], windows: list[dict]) -> list[dict]:
    """Per second: offered clients; of the requests finished in it: count, mean steps used,
    degraded ones, p95 latency."""
    rows = []
    for sec in range(int(max((s["t"] for s in samples), default=0)) + 1):
        xs = [s for s in samples if sec <= s["t"] < sec + 1]
        if not xs:
            continue
        steps = [st for s in xs for st in s["steps_used"]]
        rows.append({"t": sec, "clients": clients_at(windows, sec + 0.5), "requests": len(xs),
                     "steps_mean": round(sum(steps) / len(steps), 2) if steps else None,
                     "degraded": sum(s["degraded"] for s in xs),
                     "p95_s": round(p95([s["latency_s"] for s in xs]), 4)})
    return rows


def _stats(xs: list[dict], all_samples: list[dict], window: tuple[float, float]) -> dict:
    """Latency of the requests `xs`; throughput = images of any request finished inside `window`."""
    ok = [s for s in xs if s["status"] == 200]
    steps = [st for s in ok for st in s["steps_used"]]
    lo, hi = window
    done = sum(len(s["steps_used"]) for s in all_samples if lo <= s["t"] < hi)
    return {"requests": len(xs), "errors": len(xs) - len(ok),
            "p50_s": round(sorted(s["latency_s"] for s in ok)[len(ok) // 2], 4) if ok else None,
            "p95_s": round(p95([s["latency_s"] for s in ok]), 4),
            "images_per_s": round(done / (hi - lo), 3) if hi > lo else None,
            "steps_min": min(steps, default=None), "steps_max": max(steps, default=None),
            "steps_mean": round(sum(steps) / len(steps), 2) if steps else None,
            "degraded_requests": sum(s["degraded"] for s in ok)}


def summary(samples: list[dict], windows: list[dict], a: argparse.Namespace) -> dict:
    """Per phase (requests sent in it); `load` includes the onset (images queued at full steps
    before the replica degraded), `load_steady` only requests sent after its first
    --steady-after-s seconds."""
    w = {x["phase"]: x for x in windows}
    out = {ph: _stats([s for s in samples if s["phase"] == ph], samples, (w[ph]["start_t"], w[ph]["end_t"]))
           for ph in ("calm", "load", "after")}
    steady_from = w["load"]["start_t"] + a.steady_after_s
    out["load_steady"] = _stats([s for s in samples if s["phase"] == "load" and s["sent_t"] >= steady_from],
                                samples, (steady_from, w["load"]["end_t"]))
    for key in ("load", "load_steady"):
        ph = out[key]
        ph["p95_under_target"] = ph["p95_s"] <= a.p95_target_s
        ph["steps_within_bounds"] = bool(ph["steps_min"] is not None and
                                         a.min_steps <= ph["steps_min"] <= ph["steps_max"] <= a.steps)
    return out


def plot(timelines: dict[str, list[dict]], target_s: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(3, 1, sharex=True, figsize=(8, 7))
    for side, rows in timelines.items():
        t = [r["t"] for r in rows]
        for ax, key in zip(axes, ("clients", "steps_mean", "p95_s"), strict=False):
            ax.plot(t, [r[key] for r in rows], marker=".", label=f"adaptive {'on' if side == 'auto' else 'off'}")
    axes[2].axhline(target_s, color="red", linestyle="--", linewidth=1, label=f"p95 target {target_s:g} s")
    for ax, label in zip(axes, ("load (clients)", "steps used (mean)", "p95 per second (s)"), strict=False):
        ax.set_ylabel(label)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[2].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("time since the side's start (s)")
    fig.suptitle("Adaptive quality off vs on, same load step (tiny SDXL, CPU)")
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", type=Path, default=local_app.default_models_dir())
    ap.add_argument("--size", default="64x64")
    ap.add_argument("--n", type=int, default=4, help="images per request")
    ap.add_argument("--steps", type=int, default=16, help="the model's default steps (full quality)")
    ap.add_argument("--min-steps", type=int, default=4, help="adaptive quality's floor (degraded steps)")
    ap.add_argument("--hold-s", type=float, default=2.0, help="calm time before full quality returns")
    ap.add_argument("--clients", type=int, default=12)
    ap.add_argument("--calm-s", type=float, default=4.0)
    ap.add_argument("--load-s", type=float, default=20.0)
    ap.add_argument("--p95-target-s", type=float, default=4.0, help="latency target of the load phase")
    ap.add_argument("--steady-after-s", type=float, default=5.0, help="load_steady: sent after this much load")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="adaptive_quality-tiny-cpu")
    a = ap.parse_args()
    if not 1 <= a.min_steps <= a.steps:
        ap.error(f"--min-steps must be in [1, --steps], got {a.min_steps}")
    phases = [("calm", 1, a.calm_s), ("load", a.clients, a.load_s), ("after", 1, a.calm_s)]
    tenants = {side: f"{side}-plan" for side in SIDES}
    started = time.monotonic()
    samples: dict[str, list[dict]] = {}
    windows: dict[str, list[dict]] = {}
    with local_app.serve_app(a.models, plans=plans(), tenants=tenants, model=model_entry(a)) as app:
        for side in SIDES:
            asyncio.run(run_side(app, side, a, [("warmup", 2, 2.0)]))  # kernels, allocator, first batches
            time.sleep(a.hold_s + 1)  # the replica is calm and at full quality before each side
            samples[side], windows[side] = asyncio.run(run_side(app, side, a, phases))
    timelines = {side: timeline(samples[side], windows[side]) for side in SIDES}
    result = {
        "benchmark": "adaptive_quality", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": local_app.machine(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
        "p95_target_s": a.p95_target_s, "p95_target_from": "benchmark argument --p95-target-s",
        "adaptive_quality": model_entry(a)["adaptive_quality"], "wall_s": round(time.monotonic() - started, 1),
        "summary": {side: summary(samples[side], windows[side], a) for side in SIDES},
        "phases": windows, "timeline": timelines, "samples": samples,
    }
    fixed, auto = result["summary"]["fixed"]["load"], result["summary"]["auto"]["load"]
    result["load_p95_ratio_auto_over_fixed"] = round(auto["p95_s"] / fixed["p95_s"], 3)
    result["load_steady_p95_ratio_auto_over_fixed"] = round(
        result["summary"]["auto"]["load_steady"]["p95_s"] / result["summary"]["fixed"]["load_steady"]["p95_s"], 3)
    for side in SIDES:
        print(f"[{side}] {'t':>4} {'clients':>7} {'reqs':>5} {'steps':>6} {'degr':>5} {'p95_s':>7}")
        for r in timelines[side]:
            print(f"[{side}] {r['t']:>4} {r['clients']:>7} {r['requests']:>5} {r['steps_mean']!s:>6} "
                  f"{r['degraded']:>5} {r['p95_s']:>7}")
    for side in SIDES:
        for key in ("load", "load_steady"):
            s = result["summary"][side][key]
            print(f"{side} {key}: p95 {s['p95_s']} s (target {a.p95_target_s} s: "
                  f"{'under' if s['p95_under_target'] else 'OVER'}), steps {s['steps_min']}..{s['steps_max']} "
                  f"(mean {s['steps_mean']}), {s['images_per_s']} images/s, {s['errors']} errors")
    print(f"p95 auto/fixed: load {result['load_p95_ratio_auto_over_fixed']}, "
          f"load_steady {result['load_steady_p95_ratio_auto_over_fixed']}")
    a.out.mkdir(parents=True, exist_ok=True)
    out = a.out / f"{a.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}" + (f" and {out.with_suffix('.png')}" if plot(timelines, a.p95_target_s,
                                                                        out.with_suffix(".png")) else ""))


if __name__ == "__main__":
    main()
