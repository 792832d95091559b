"""Both committed Serve configs validate against Ray's schema and genserve's typed config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppConfig, expand_env, load_app_config
from serve_app.config_check import check_document

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["local.yaml", "serve.yaml"])
def test_committed_configs_validate(name: str) -> None:
    doc = yaml.safe_load((CONFIGS / name).read_text())
    ServeDeploySchema.model_validate(doc)
    cfgs = check_document(doc)
    assert len(cfgs) == 1 and cfgs[0].diffusion_models
    # Every deployment of the graph has an autoscaling policy in the file.
    names = {"Ingress"} | {m.deployment_name for m in cfgs[0].diffusion_models} | {
        m.deployment_name for m in cfgs[0].llm_models}
    listed = {d["name"]: d for d in doc["applications"][0]["deployments"]}
    assert names == set(listed)
    assert all("autoscaling_config" in d for d in listed.values())


def test_production_config_uses_fractional_gpus_and_real_models() -> None:
    doc = yaml.safe_load((CONFIGS / "serve.yaml").read_text())
    app = doc["applications"][0]
    models = {m["model"] for m in app["args"]["diffusion_models"]}
    assert {"stabilityai/stable-diffusion-xl-base-1.0", "warp-ai/wuerstchen"} <= models
    diffusion = [d for d in app["deployments"] if d["name"].startswith("Diffusion-")]
    assert diffusion and all(d["ray_actor_options"]["num_gpus"] == 0.5 for d in diffusion)
    assert all(d["max_ongoing_requests"] > 5 for d in app["deployments"])  # Serve's default of 5 caps batches


def test_production_config_holds_ingress_llm_and_diffusion_nodes() -> None:
    """All three kinds of node, and `enhance` resolves to an LLM deployed in the same file, on vLLM
    with whole GPUs, that the plans let tenants use (issue 18: production answered 404 before)."""
    doc = yaml.safe_load((CONFIGS / "serve.yaml").read_text())
    (cfg,) = check_document(doc)
    deps = {d["name"]: d for d in doc["applications"][0]["deployments"]}
    kinds = {name.split("-", 1)[0] for name in deps}
    assert kinds == {"Ingress", "LLM", "Diffusion"}, sorted(deps)
    llm = cfg.enhance_llm
    assert llm is not None and cfg.find_llm(llm.name) is llm
    assert llm.deployment_name in deps, f"enhance model {llm.name!r} has no deployment"
    assert (llm.model, llm.engine) == ("meta-llama/Llama-3.1-8B-Instruct", "vllm")
    assert llm.max_model_len == 8192 and llm.engine_kwargs["max_num_seqs"] == 256
    dep = deps[llm.deployment_name]
    assert dep["ray_actor_options"]["num_gpus"] == 1
    # Serve admits as many as the engine batches; the autoscaler targets well below that.
    assert dep["max_ongoing_requests"] >= llm.engine_kwargs["max_num_seqs"] > dep["autoscaling_config"][
        "target_ongoing_requests"]
    assert dep["max_queued_requests"] > 0
    for plan in cfg.tenancy.plans:
        assert plan.allows(llm.name), f"plan {plan.name!r} can't use enhance"


def test_enhance_model_must_be_an_llm() -> None:
    args = copy.deepcopy(_local_doc()["applications"][0]["args"])
    args["enhance_model"] = "sdxl-tiny"
    with pytest.raises(ValidationError, match=r"enhance_model \('sdxl-tiny'\) is not one of llm_models"):
        AppConfig.model_validate(args)
    args["enhance_model"] = "chat"  # an alias of tiny-chat
    assert AppConfig.model_validate(args).enhance_llm.name == "tiny-chat"


def test_llm_context_is_not_set_twice() -> None:
    args = copy.deepcopy(_local_doc()["applications"][0]["args"])
    args["llm_models"][0]["engine_kwargs"] = {"max_model_len": 4096}
    with pytest.raises(ValidationError, match="engine_kwargs.max_model_len"):
        AppConfig.model_validate(args)


def test_llm_gpus_must_be_whole() -> None:
    doc = _local_doc()
    llm = next(d for d in doc["applications"][0]["deployments"] if d["name"].startswith("LLM-"))
    llm["ray_actor_options"]["num_gpus"] = 0.5
    with pytest.raises(ValueError, match="must be whole GPUs"):
        check_document(doc)


def _local_doc() -> dict:
    return yaml.safe_load((CONFIGS / "local.yaml").read_text())


@pytest.mark.parametrize("gpus", [0.1, 1.5])
def test_gpu_fraction_out_of_range_is_rejected(gpus: float) -> None:
    doc = _local_doc()
    doc["applications"][0]["deployments"][1]["ray_actor_options"]["num_gpus"] = gpus
    with pytest.raises(ValueError, match=rf"num_gpus must be .* got {gpus}"):
        check_document(doc)


def test_unknown_deployment_name_is_rejected() -> None:
    doc = _local_doc()
    doc["applications"][0]["deployments"].append({"name": "Diffusion-typo", "num_replicas": 1})
    with pytest.raises(ValueError, match="Diffusion-typo"):
        check_document(doc)


@pytest.mark.parametrize(
    ("path", "value", "needle"),
    [
        (("diffusion_models", 0, "batching", "max_batch_size"), 0, "max_batch_size"),
        (("diffusion_models", 0, "family"), "dalle", "family"),
        (("diffusion_models", 0, "default_steps"), 100, "default_steps (100) must be <= max_steps (8)"),
        (("diffusion_models", 0, "native_resolution"), 60, "native_resolution (60) must be a multiple"),
        (("diffusion_models", 0, "nonsense"), 1, "nonsense"),
        (("default_image_model",), "nope", "default_image_model ('nope')"),
    ],
)
def test_app_config_errors_name_field_and_value(path: tuple, value: object, needle: str) -> None:
    args = copy.deepcopy(_local_doc()["applications"][0]["args"])
    node = args
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ValidationError) as info:
        AppConfig.model_validate(args)
    assert needle in str(info.value)


def test_duplicate_alias_is_rejected() -> None:
    args = copy.deepcopy(_local_doc()["applications"][0]["args"])
    args["diffusion_models"][1]["aliases"] = ["v6"]
    with pytest.raises(ValidationError, match="'v6' is used twice"):
        AppConfig.model_validate(args)


def test_env_expansion_and_local_paths(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("GENSERVE_WORK", str(tmp_path))
    assert expand_env("${GENSERVE_WORK:-x}/m") == f"{tmp_path}/m"
    monkeypatch.delenv("GENSERVE_WORK")
    assert expand_env("${GENSERVE_WORK:-.work}/m") == ".work/m"
    cfg = load_app_config(_local_doc()["applications"][0]["args"])
    assert Path(cfg.diffusion_models[0].model).is_absolute()
    prod = load_app_config(yaml.safe_load((CONFIGS / "serve.yaml").read_text())["applications"][0]["args"])
    assert prod.diffusion_models[0].model == "stabilityai/stable-diffusion-xl-base-1.0"  # hub ids untouched
