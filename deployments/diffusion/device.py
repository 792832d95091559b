"""A diffusion replica's CPU threads (its device and GPU share: deployments/placement.py)."""

from __future__ import annotations


def set_cpu_threads(device: str) -> None:
    """On CPU, use as many torch threads as the replica was given CPUs (oversubscribed intra-op
    threads made tiny models several times slower on a shared 2-core host)."""
    if device != "cpu":
        return
    import ray
    import torch

    if ray._private.worker.global_worker.mode != ray.WORKER_MODE:
        return  # not a Ray actor (Serve's local testing mode, a test): no CPU share to size threads by
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    torch.set_num_threads(max(1, int(cpus)))

