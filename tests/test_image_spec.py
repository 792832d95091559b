"""`ImageSpec`, the one typed form of a rendered image request: what replicas draw (`tasks()`), what a
job stores and re-runs, what `Job.params` and the generation log show (`describe()`). Job rows stored
before it (the untyped dict of issue 19's "nine representations") still load to the same images."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deployments.diffusion.types import ImageTask, WeightedPrompt
from serve_app.config import load_app_config
from serve_app.images.protocol import ImageGenerationRequest
from serve_app.images.render import ConfigTemplates, render_image_request
from serve_app.images.spec import ImageSpec
from serve_app.library.templates import ResolvedTemplate

CFG = load_app_config(yaml.safe_load(
    (Path(__file__).resolve().parent.parent / "configs" / "local.yaml").read_text())["applications"][0]["args"])

# A job's `spec` column as the previous version wrote it (jobs.runner.spec_of: `asdict` of each
# ImageTask, the describe() view as `params`, `template_ref` = asdict(ResolvedTemplate), and the
# prompt before `enhance` as `asked_prompt`), for "a red cat::2 green grass::-0.5 --ar 16:9 --c 40 --tile".
_TASK = {"prompt": "a red cat, green grass", "negative_prompt": "blur", "width": 88, "height": 48, "steps": 2,
         "tile": True, "weighted_prompts": [{"text": "a red cat", "weight": 2.0},
                                            {"text": "green grass", "weight": -0.5}],
         "task_id": None, "trace_context": None, "priority": 3, "quality_auto": True, "embed_metadata": True}
OLD_ROW = {
    "model": "sdxl-tiny", "prompt": "a red cat, green grass", "negative_prompt": "blur",
    "tasks": [{**_TASK, "seed": 7, "guidance_scale": 5.1234}, {**_TASK, "seed": 8, "guidance_scale": 4.9}],
    "tenant": "acme",
    "params": {"model": "sdxl-tiny", "prompt": "a red cat, green grass", "negative_prompt": "blur", "width": 88,
               "height": 48, "steps": 2, "guidance_scale": [5.1234, 4.9], "seeds": [7, 8], "tile": True,
               "weighted_prompts": [{"text": "a red cat", "weight": 2.0}, {"text": "green grass", "weight": -0.5}],
               "params": {"aspect_ratio": [16, 9], "stylize": None, "chaos": 40, "quality": None, "negative": [],
                          "seed": None, "tile": True, "model": None, "enhance": False}},
    "template_ref": {"name": "shot", "version": 2, "template": "{subject}", "defaults": "", "source": "tenant",
                     "id": 5},
    "asked_prompt": "a cat",
}


def test_a_job_row_stored_before_the_spec_loads_to_the_same_images() -> None:
    spec = ImageSpec.from_stored(json.loads(json.dumps(OLD_ROW)))  # as it comes back from the JSON column
    old_tasks = [ImageTask(**{**t, "weighted_prompts": tuple(WeightedPrompt(**w) for w in t["weighted_prompts"])})
                 for t in OLD_ROW["tasks"]]
    assert list(spec.tasks()) == old_tasks  # same prompt, seeds, sizes, guidance, weights, QoS: same images
    assert spec.describe() == OLD_ROW["params"]  # Job.params as the API showed it
    assert (spec.asked_prompt, spec.tenant) == ("a cat", "acme")
    assert spec.template == ResolvedTemplate(name="shot", version=2, template="{subject}", defaults="",
                                             source="tenant", id=5)
    # Stored again in the new shape, it reads back equal.
    assert ImageSpec.from_stored(json.loads(json.dumps(spec.model_dump(mode="json")))) == spec


def test_render_stores_and_reloads_without_loss() -> None:
    body = ImageGenerationRequest(prompt="a red cat::2 green grass::-0.5 --ar 16:9 --c 40 --tile", n=3, seed=9,
                                  negative_prompt="blur")
    spec = render_image_request(CFG, ConfigTemplates(CFG), body, tenant="acme")
    assert spec.seeds == (9, 10, 11) and len(set(spec.guidance_scales)) == 3  # --c varies each image
    assert [(w.text, w.weight) for w in spec.weighted_prompts] == [("a red cat", 2.0), ("green grass", -0.5)]
    stored = json.loads(json.dumps(spec.model_dump(mode="json")))
    assert stored["spec_version"] == 2 and ImageSpec.from_stored(stored) == spec
    ids = ["job_1:1:0", "job_1:1:1", "job_1:1:2"]
    tasks = ImageSpec.from_stored(stored).tasks(ids)
    assert [t.task_id for t in tasks] == ids and {t.tile for t in tasks} == {True}
    assert [t.seed for t in tasks] == [9, 10, 11]


def test_image_gpu_seconds_are_scaled_by_the_replicas_gpu_share() -> None:
    """Two half-GPU replicas on one card bill one GPU-second per second between them, not two."""
    from deployments.diffusion.types import ImageResult
    from serve_app.images.service import gpu_seconds

    def result(batch: int, share: float) -> ImageResult:
        return ImageResult(png=b"", seed=0, width=64, height=64, steps=2, guidance_scale=5.0, model="m",
                           batch_size=batch, compute_s=4.0, gpu_share=share)

    assert gpu_seconds([result(2, 1.0)]) == 2.0
    assert gpu_seconds([result(2, 0.5), result(2, 0.5)]) == 2.0  # a batch of 2 on half a GPU
    assert gpu_seconds([result(4, 0.25)]) == 0.25
