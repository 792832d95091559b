"""Replica placement without a cluster: which torch device a Ray GPU assignment maps to, and the Serve
options (placement-group bundles, strategy, GPUs) the graph gives a tensor-parallel vLLM replica.
The placement on a real (fake-GPU) cluster is tests/test_multi_gpu_placement.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from deployments.llm.config import LLMModelConfig
from deployments.llm.vllm_engine import VLLMEngine
from deployments.placement import Assignment, engine_bundles, local_cuda_index, pin_device, resolve_device

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("gpu_ids, visible, index", [
    (["1"], "1", 0),          # Ray set CUDA_VISIBLE_DEVICES to the assigned card: torch's cuda:0
    (["2", "3"], "2,3", 0),
    (["3"], "0,1,2,3", 3),    # Ray told not to set it (NOSET): the physical index
    (["3"], None, 3),
    ([], "0", 0),
])
def test_assigned_gpu_maps_to_its_torch_index(gpu_ids: list[str], visible: str | None, index: int) -> None:
    assert local_cuda_index(gpu_ids, visible) == index


def test_an_assigned_gpu_hidden_by_the_environment_is_an_error() -> None:
    with pytest.raises(RuntimeError, match="hides it"):
        local_cuda_index(["1"], "0")


def test_auto_device_is_cpu_without_cuda_and_cuda_is_refused() -> None:
    assert resolve_device("auto", cuda_available=False) == "cpu"
    assert resolve_device("auto", cuda_available=True) == "cuda"
    assert resolve_device("cpu", cuda_available=True) == "cpu"
    with pytest.raises(RuntimeError, match="no CUDA"):
        resolve_device("cuda", cuda_available=False)


def test_cpu_replica_is_not_pinned_even_with_fake_gpus() -> None:
    # A fake GPU (ray start --num-gpus on a CPU host) gives ids but torch has no CUDA: nothing to pin.
    assert pin_device("cpu", Assignment(node_id="n", gpu_ids=["1"], gpu_share=0.5, cuda_visible_devices="1")) is None


def _llm(**kw) -> LLMModelConfig:
    return LLMModelConfig(name="big", model="meta-llama/Llama-3.1-70B-Instruct", engine="vllm", **kw)


def test_one_gpu_model_keeps_the_serve_config_placement() -> None:
    m = _llm()
    assert m.num_gpus_per_replica == 1 and m.deployment_options() == {}
    assert "tensor_parallel_size" not in m.resolved_engine_kwargs()


@pytest.mark.parametrize("tp, pp", [(2, 1), (4, 1), (2, 2)])
def test_multi_gpu_model_gets_one_gpu_bundle_per_worker(tp: int, pp: int) -> None:
    m = _llm(tensor_parallel_size=tp, pipeline_parallel_size=pp, replica_cpus=4)
    opts = m.deployment_options()
    n = tp * pp
    # As ray.llm: the replica actor's CPUs merged into the first worker's bundle; no GPU of its own.
    assert opts["placement_group_bundles"] == [{"CPU": 4.0, "GPU": 1.0}] + [{"GPU": 1.0}] * (n - 1)
    assert opts["placement_group_strategy"] == "PACK"
    assert opts["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0}
    kw = m.resolved_engine_kwargs()
    assert (kw["tensor_parallel_size"], kw["pipeline_parallel_size"], kw["distributed_executor_backend"]) == (
        tp, pp, "ray")
    engine = VLLMEngine(m.model, **kw)
    assert engine.num_devices == n
    args = engine.engine_args()
    assert (args["tensor_parallel_size"], args["distributed_executor_backend"]) == (tp, "ray")


def test_bundles_without_replica_cpus() -> None:
    assert engine_bundles(2, 0) == [{"GPU": 1.0}, {"GPU": 1.0}]


@pytest.mark.parametrize("kw, match", [
    ({"tensor_parallel_size": 2, "engine": "transformers"}, "needs engine: vllm"),
    ({"tensor_parallel_size": 2, "engine": "auto"}, "needs engine: vllm"),
    ({"engine_kwargs": {"tensor_parallel_size": 2}}, "engine_kwargs.tensor_parallel_size"),
    ({"tensor_parallel_size": 2, "engine_kwargs": {"distributed_executor_backend": "mp"}}, "'mp'"),
    ({"tensor_parallel_size": 0}, "greater than or equal to 1"),
])
def test_bad_parallel_settings_are_refused_with_the_field_named(kw: dict, match: str) -> None:
    kw = {"engine": "vllm", **kw}
    with pytest.raises(ValidationError, match=match):
        LLMModelConfig(name="big", model="m", **kw)


def _deployments_of(app) -> dict:
    """name -> Serve Deployment of every deployment bound into the application graph."""
    from ray.serve.deployment import Application

    found: dict = {}

    def walk(obj) -> None:
        if isinstance(obj, Application):
            d = obj._bound_deployment
            found[d.name] = d
            for a in [*d.init_args, *d.init_kwargs.values()]:
                walk(a)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                walk(v)

    walk(app)
    return found


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_graph_binds_the_llm_deployment_with_its_placement(tp: int, tmp_path: Path) -> None:
    from serve_app.graph import build_app

    args = {"work_dir": str(tmp_path),
            "diffusion_models": [{"name": "img", "family": "sdxl", "model": str(tmp_path / "img")}],
            "llm_models": [{"name": "big", "model": str(tmp_path / "llm"), "engine": "vllm",
                            "tensor_parallel_size": tp, "replica_cpus": 2, "placement_label_selector": {"pool": "gpu"}}]}
    dep = _deployments_of(build_app(args))["LLM-big"]
    rc = dep._replica_config
    if tp == 1:
        assert rc.placement_group_bundles is None and rc.placement_group_strategy is None
        return
    assert rc.placement_group_bundles == [{"CPU": 2.0, "GPU": 1.0}] + [{"GPU": 1.0}] * (tp - 1)
    assert rc.placement_group_strategy == "PACK"
    assert rc.ray_actor_options["num_gpus"] == 0 and rc.ray_actor_options["num_cpus"] == 2
    assert sum(b.get("GPU", 0) for b in rc.placement_group_bundles) == tp
    assert rc.placement_group_bundle_label_selector == [{"pool": "gpu"}] * tp  # Serve broadcasts one to all


def test_70b_config_is_the_production_config_plus_a_tensor_parallel_model() -> None:
    """configs/serve-70b.yaml = configs/serve.yaml + one 70B-class model on tensor parallel 2 (the
    rest must not drift: copy serve.yaml's changes over when this fails)."""
    from ray.serve.schema import ServeDeploySchema

    from serve_app.config_check import check_document

    base = yaml.safe_load((CONFIGS / "serve.yaml").read_text())
    big = yaml.safe_load((CONFIGS / "serve-70b.yaml").read_text())
    ServeDeploySchema.model_validate(big)
    (cfg,) = check_document(big)
    m = cfg.find_llm("llama-3.1-70b-instruct")
    assert m is not None and m.tensor_parallel_size == 2 and m.engine == "vllm"
    opts = m.deployment_options()
    assert len(opts["placement_group_bundles"]) == 2 and opts["placement_group_strategy"] == "STRICT_PACK"
    assert opts["placement_group_bundle_label_selector"] == [{"genserve.io/pool": "gpu-llm"}]
    app = big["applications"][0]
    dep = next(d for d in app["deployments"] if d["name"] == m.deployment_name)
    # The graph's placement group sets the replica's resources; a num_gpus here would starve worker 0.
    assert "ray_actor_options" not in dep and "placement_group_bundles" not in dep
    app["args"]["llm_models"] = [x for x in app["args"]["llm_models"] if x["name"] != m.name]
    app["deployments"] = [d for d in app["deployments"] if d["name"] != m.deployment_name]
    assert big == base


def test_a_multi_gpu_engine_outside_its_placement_group_is_refused() -> None:
    from deployments.placement import check_multi_gpu_replica

    with pytest.raises(RuntimeError, match="needs the replica's placement group"):
        check_multi_gpu_replica(2)
