"""The diffusion deployment is bound with its typed `DiffusionModelConfig` (no kwargs, no dicts):
the replica reads it as is, and only `user_config` (JSON that crossed Serve, maybe hand-edited) is
validated again, as `BatchingConfig`, with errors naming the field. The deployment class is built
in-process here (no Serve): it hands the config object to its `DiffusionServer` and delegates
`reconfigure` to it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from deployments.diffusion.config import DiffusionModelConfig
from deployments.diffusion.deployment import DiffusionDeployment


@pytest.fixture(scope="module")
def replica(tiny_models_dir: Path) -> DiffusionDeployment:
    cfg = DiffusionModelConfig(name="c", family="sdxl", model=str(tiny_models_dir / "sdxl-tiny"), device="cpu",
                               native_resolution=64, size_multiple=8, min_side=32, max_side=128,
                               batching={"max_batch_size": 4, "batch_wait_timeout_s": 0.01},
                               adaptive_quality={"enabled": True, "hold_s": 3.0},
                               optimize={"channels_last": True}, vae_slicing=False)
    return DiffusionDeployment.func_or_class(cfg)


def test_the_replica_runs_its_config_object(replica: DiffusionDeployment) -> None:
    server = replica.server
    cfg = server.config
    assert server.quality.settings is cfg.adaptive_quality  # the same object, not a rebuilt twin
    assert server.batching.max_batch_size == 4
    assert server.batching.max_batch_megapixels == cfg.batch_megapixels == 4 * 64 * 64 / 1e6
    assert server.batcher.max_batch_cost == cfg.batch_megapixels
    weight = server.engine.pipeline.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)  # optimize reached the pipeline


def test_user_config_reconfigures_batching_and_names_bad_fields(replica: DiffusionDeployment) -> None:
    server = replica.server
    replica.reconfigure(DiffusionModelConfig.model_validate(
        {**server.config.model_dump(), "batching": {"max_batch_size": 2, "batch_wait_timeout_s": 0.0}}
    ).batching_user_config())
    assert (server.batching.max_batch_size, server.batching.batch_wait_timeout_s) == (2, 0.0)
    assert (server.batcher.max_batch_size, server.batcher.wait_s) == (2, 0.0)
    with pytest.raises(ValidationError, match="max_batch_size"):
        replica.reconfigure({"max_batch_size": 0})
    with pytest.raises(ValidationError, match="max_batch_sise"):
        replica.reconfigure({"max_batch_sise": 4})  # a typo is refused, not ignored
    with pytest.raises(ValueError, match="priority_aging_s"):
        replica.reconfigure({"priority_aging_s": 1.0})
    assert server.batching.max_batch_size == 2  # a refused update changes nothing
