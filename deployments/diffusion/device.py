"""Where a diffusion replica runs: its device, its CPU threads, its share of the GPU's memory."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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


def cap_gpu_memory(device: str) -> float | None:
    """Hold a fractional-GPU replica to its share of the card (Ray only divides scheduling)."""
    if device != "cuda":
        return None
    import ray
    import torch

    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 1.0))
    if 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(share)
    return share
