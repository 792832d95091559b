"""Where a model replica runs: the node and GPUs Ray assigned it, and the torch device that follows.

Shared by the diffusion and LLM replicas (nothing of the application: tests/test_architecture.py).

What Ray 2.60 does (ray/_private/utils.py `set_visible_accelerator_ids`, read 2026-12): before an
actor's constructor runs, Ray sets `CUDA_VISIBLE_DEVICES` to the ids in
`get_runtime_context().get_accelerator_ids()["GPU"]` (the node's physical indices, e.g. "1"). Two
`num_gpus: 0.5` replicas on the same card both get ["1"]; inside each process torch sees only that
card, as `cuda:0`. An actor with no GPU (num_gpus 0) keeps the environment it inherited unless
RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1; with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES=1 Ray sets
nothing and the physical index is the torch index. `local_cuda_index` handles all three. Fake GPUs
(`ray start --num-gpus 2` on a CPU host) get ids and the variable too, but torch has no CUDA: device
"auto" resolves to "cpu" there.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Assignment:
    """What Ray gave this replica. Outside a Ray actor (tests, Serve's local mode) it is empty."""

    node_id: str | None = None
    gpu_ids: list[str] = field(default_factory=list)  # Ray's ids = the node's physical GPU indices
    gpu_share: float = 0.0  # the GPU resource assigned: 0.5 = half a card, 2 = two cards
    cuda_visible_devices: str | None = None  # as this process sees it
    actor_id: str | None = None  # tells replicas apart in stats

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def current_assignment() -> Assignment:
    import ray

    if not ray.is_initialized() or ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return Assignment(cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
    ctx = ray.get_runtime_context()
    return Assignment(node_id=ctx.get_node_id(), gpu_ids=list(ctx.get_accelerator_ids().get("GPU", [])),
                      gpu_share=float(ctx.get_assigned_resources().get("GPU", 0.0)),  # type: ignore[no-untyped-call, unused-ignore]  # Ray is untyped; used under --strict only
                      cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), actor_id=ctx.get_actor_id())


def local_cuda_index(gpu_ids: list[str], cuda_visible_devices: str | None) -> int:
    """The torch index of the first assigned GPU: its position in CUDA_VISIBLE_DEVICES when Ray set
    it (0), else its physical index (Ray told not to set the variable), else 0 (no assignment)."""
    if not gpu_ids:
        return 0
    visible = [v.strip() for v in (cuda_visible_devices or "").split(",") if v.strip()]
    if visible:
        if gpu_ids[0] not in visible:
            raise RuntimeError(f"Ray assigned GPU {gpu_ids[0]} but CUDA_VISIBLE_DEVICES={cuda_visible_devices!r} "
                               "hides it")
        return visible.index(gpu_ids[0])
    return int(gpu_ids[0])


def resolve_device(requested: str, cuda_available: bool | None = None) -> str:
    """"auto" → "cuda" when torch has CUDA, else "cpu" (fake GPUs on a CPU host included)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cuda" and not cuda_available:
        raise RuntimeError("device: cuda, but torch sees no CUDA device (CPU build of torch, or "
                           "CUDA_VISIBLE_DEVICES hides every card): use device auto or cpu")
    return requested


def pin_device(device: str, assignment: Assignment) -> float | None:
    """On CUDA: make the assigned card torch's current device and hold a fractional replica to its
    share of that card's memory (Ray divides scheduling only). Returns the share (None on CPU)."""
    if device != "cuda":
        return None
    import torch

    index = local_cuda_index(assignment.gpu_ids, assignment.cuda_visible_devices)
    torch.cuda.set_device(index)
    share = assignment.gpu_share if assignment.gpu_ids else 1.0
    if 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share, device=index)
    return share


def place_replica(requested_device: str) -> tuple[str, Assignment, float | None]:
    """The replica's device, its assignment and its GPU share: what a model replica calls first."""
    assignment = current_assignment()
    device = resolve_device(requested_device)
    return device, assignment, pin_device(device, assignment)


# --- Multi-GPU engines (vLLM tensor/pipeline parallel): Serve placement-group options ---------------

def engine_bundles(num_devices: int, replica_cpus: float) -> list[dict[str, float]]:
    """One `{"GPU": 1}` bundle per engine worker, the replica actor's CPUs merged into the first, as
    Ray's LLM server does (ray.llm `_merge_replica_actor_and_child_actor_bundles`): Serve places the
    replica in bundle 0, so it lands beside the rank-0 worker."""
    bundles: list[dict[str, float]] = [{"GPU": 1.0} for _ in range(num_devices)]
    if replica_cpus:
        bundles[0] = {"CPU": float(replica_cpus), **bundles[0]}
    return bundles


def multi_gpu_options(num_devices: int, *, replica_cpus: float, strategy: str,
                      label_selector: dict[str, str] | None = None) -> dict[str, Any]:
    """Serve deployment options for a replica whose engine spans `num_devices` GPUs (> 1): the
    replica holds no GPU itself; the engine's Ray workers take one bundle each."""
    if num_devices < 2:
        raise ValueError(f"multi_gpu_options is for engines over >= 2 GPUs, got {num_devices}")
    options: dict[str, Any] = {"placement_group_bundles": engine_bundles(num_devices, replica_cpus),
                               "placement_group_strategy": strategy,
                               "ray_actor_options": {"num_cpus": replica_cpus, "num_gpus": 0}}
    if label_selector:  # Serve applies a single selector to every bundle
        options["placement_group_bundle_label_selector"] = [dict(label_selector)]
    return options


def check_multi_gpu_replica(num_devices: int) -> Any:
    """In a multi-GPU replica: its placement group, after checking the replica itself holds no GPU
    (a Serve config's `ray_actor_options.num_gpus: 1` would take bundle 0's GPU from engine worker 0,
    which then waits forever)."""
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is None:
        raise RuntimeError(f"an engine over {num_devices} GPUs needs the replica's placement group "
                           "(placement_group_bundles, set by serve_app/graph.py from tensor_parallel_size)")
    gpus = sum(b.get("GPU", 0) for b in group.bundle_specs)
    if gpus < num_devices:
        raise RuntimeError(f"the replica's placement group has {gpus} GPUs for an engine over {num_devices}: "
                           "a Serve config's placement_group_bundles must give one {GPU: 1} bundle per worker")
    held = current_assignment().gpu_share
    if held:
        raise RuntimeError(f"this replica holds {held} GPU itself: set ray_actor_options.num_gpus to 0 (or leave "
                           "ray_actor_options out) for a tensor/pipeline-parallel deployment; its engine "
                           "workers take the GPUs of the placement group")
    return group
