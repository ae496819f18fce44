"""Starting or joining Ray the same way from every CLI, on a laptop or under `ray job submit`."""
from __future__ import annotations

import logging
import os

log = logging.getLogger("hnm_ray")

NAMESPACE = "hnm_ray"


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS (as under `ray job submit`), else start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True)
        log.info("joined Ray cluster at %s: %s", address, ray.cluster_resources())
    else:
        # address="local": without it ray.init joins the newest Ray started on this machine (another job's)
        ray.init(address="local", num_cpus=num_cpus, namespace=NAMESPACE, include_dashboard=False)
        log.info("started local Ray: %s", ray.cluster_resources())


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has (0 on CPU-only machines)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def torch_device(use_gpu: bool) -> str:
    """The torch device to use inside a task: explicit, since tasks with num_gpus=0 may still see GPUs."""
    import torch

    return "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
