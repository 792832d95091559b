"""Admission and settle on the app database, and what prebuilt statements save, in one run.

    python -m benchmarks.admission [--database-url postgresql://...] [--n 500]

Side by side on the same connection: the rate-window upsert built per execution (as the code did
before serve_app/tenancy/statements.py) and the prebuilt one; then `Tenancy.admit_sync` +
`settle_sync` p50 for a plan with every limit on (requests, tokens, concurrency, budget).
Writes benchmarks/results/admission-<dialect>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PLAN = {"name": "bench", "allowed_models": "*", "requests_per_minute": 10**9, "tokens_per_minute": 10**12,
        "max_concurrent_requests": 10**6, "monthly_budget_usd": 10**6}


def _p50_us(fn: Callable[[], Any], n: int) -> float:
    xs = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        xs.append(time.perf_counter() - t0)
    return round(statistics.median(xs) * 1e6, 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--database-url", default=None, help="default: a SQLite file in a temp dir")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()

    from serve_app.tenancy import Tenancy, TenancyConfig
    from serve_app.tenancy.db import insert_for, write_tx
    from serve_app.tenancy.models import RateCounter
    from serve_app.tenancy.statements import statement

    work = Path(tempfile.mkdtemp(prefix="genserve-admission-"))
    url = args.database_url or f"sqlite:///{work / 'app.db'}"
    tenancy = Tenancy(TenancyConfig(database_url=url, plans=[PLAN], default_plan="bench", key_pepper="bench"),
                      work_dir=work)
    tenant = tenancy.create_tenant(f"bench-{os.getpid()}", "bench")
    ctx = tenancy.authenticate_sync(tenancy.create_key(tenant.name).key)

    with write_tx(tenancy.engine) as conn:
        def built() -> None:  # what limits_sql.acquire did per need before the statements were prebuilt
            ins = insert_for(conn)(RateCounter).values(tenant_id=ctx.tenant_id, kind="bench", window_start=0, used=1)
            conn.execute(ins.on_conflict_do_update(
                index_elements=[RateCounter.tenant_id, RateCounter.kind, RateCounter.window_start],
                set_={"used": RateCounter.used + 1}, where=RateCounter.used + 1 <= 10**12,
            ).returning(RateCounter.used)).scalar()

        def prebuilt() -> None:
            conn.execute(statement(conn, "rate_take"), {"t": ctx.tenant_id, "k": "bench", "ws": 0, "n": 1,
                                                        "lim": 10**12}).scalar()

        rounds = [{"built_us": _p50_us(built, args.n), "prebuilt_us": _p50_us(prebuilt, args.n)} for _ in range(2)]

    def admit_settle() -> tuple[float, float]:
        t0 = time.perf_counter()
        adm = tenancy.admit_sync(ctx, route="chat", model="m", est_tokens=200)
        t1 = time.perf_counter()
        adm.add(prompt_tokens=10, completion_tokens=100)
        adm.settle_sync("ok")
        return t1 - t0, time.perf_counter() - t1

    times = [admit_settle() for _ in range(args.n)]
    tenancy.close()
    dialect = url.split(":", 1)[0].split("+", 1)[0]
    result = {
        "benchmark": "admission", "dialect": dialect, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "n": args.n, "upsert_per_execution": rounds,
        "built_over_prebuilt": round(statistics.median(r["built_us"] / r["prebuilt_us"] for r in rounds), 1),
        "admit_p50_ms": round(statistics.median(t[0] for t in times) * 1000, 3),
        "settle_p50_ms": round(statistics.median(t[1] for t in times) * 1000, 3),
    }
    out = args.out or REPO / "benchmarks" / "results" / f"admission-{dialect}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
