"""The transformers engine's two schedulers side by side: continuous vs static batching, engine only
(no Ray, no HTTP), closed-loop clients with answers of mixed length, alternating rounds in one run.

    python -m benchmarks.llm_schedulers --concurrency 1,4,8 --requests 6 --rounds 3

Answer lengths are drawn per request between `--min-tokens` and `--max-tokens` (seeded), which
is what splits static batches: a row that ends early idles until the longest one is done.
Writes benchmarks/results/llm_schedulers-<device>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")).resolve()


async def _round(engine: Any, prompt: list[int], lengths: list[int], concurrency: int, tag: str) -> dict[str, Any]:
    from deployments.llm.types import SamplingParams

    queue = list(enumerate(lengths))
    ttfts: list[float] = []
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            i, n = queue.pop(0)
            t0, first = time.perf_counter(), None
            async for d in engine.generate(f"{tag}-{i}", prompt, SamplingParams(max_tokens=n, temperature=1.0, seed=i)):
                tokens += len(d.token_ids)
                if first is None and d.token_ids:
                    first = time.perf_counter() - t0
            ttfts.append(first or 0.0)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"tokens_per_s": round(tokens / wall, 1), "ttft_ms_p50": round(1000 * statistics.median(ttfts), 1),
            "tokens": tokens, "wall_s": round(wall, 3)}


async def run(args: argparse.Namespace, model: str, dtype: str) -> list[dict[str, Any]]:
    from deployments.llm.transformers_engine import TransformersEngine

    engines = {s: TransformersEngine(model, max_model_len=args.max_tokens + 64, dtype=dtype,
                                     max_batch_size=args.max_batch, scheduler=s) for s in ("continuous", "static")}
    for e in engines.values():
        await e.start()
    prompt = list(range(5, 5 + args.prompt_tokens))
    rng = random.Random(0)
    out = []
    try:
        for c in args.concurrency:
            lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in range(args.requests * c)]
            rounds: dict[str, list] = {s: [] for s in engines}
            for r in range(args.rounds + 1):  # the first round warms both up, not counted
                for s, e in engines.items():
                    res = await _round(e, prompt, lengths, c, f"{s}{c}-{r}")
                    if r:
                        rounds[s].append(res)
            med = {s: statistics.median(x["tokens_per_s"] for x in rs) for s, rs in rounds.items()}
            out.append({"concurrency": c, "rounds": rounds,
                        "tokens_per_s": med, "continuous_over_static": round(med["continuous"] / med["static"], 3),
                        "ttft_ms_p50": {s: statistics.median(x["ttft_ms_p50"] for x in rs) for s, rs in rounds.items()}})
            print(json.dumps({k: v for k, v in out[-1].items() if k != "rounds"}), flush=True)
    finally:
        for e in engines.values():
            await e.shutdown()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=lambda s: [int(c) for c in s.split(",")], default=[1, 4, 8])
    p.add_argument("--requests", type=int, default=6, help="requests per client per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--full", action="store_true", help="the 1.1B Llama shapes (benchmarks.llm_overhead) on GPU")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    import torch

    if args.full:
        from benchmarks.llm_overhead import build_full_llm

        model, dtype = str(build_full_llm(WORK / "models" / "llm-1b")), "float16"
    else:
        from deployments.llm.tiny import build_tiny_llm

        model, dtype = str(build_tiny_llm(WORK / "models" / "llm-tiny")), "float32"
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    result = {"benchmark": "llm_schedulers", "model": "1.1B Llama shapes, random" if args.full else "tiny random Llama",
              "device": device, "host": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "params": {k: v for k, v in vars(args).items() if k != "out"},
              "runs": asyncio.run(run(args, model, dtype))}
    out = args.out or REPO / "benchmarks" / "results" / f"llm_schedulers-{'gpu' if args.full else 'tiny-cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    try:  # the plot is optional where matplotlib is not installed (GPU hosts)
        from benchmarks.plot import llm_schedulers as plot_llm_schedulers
    except ImportError:
        plot_llm_schedulers = None
    if plot_llm_schedulers is not None:
        plot_llm_schedulers(result, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
