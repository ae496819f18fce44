"""Starting or joining Ray the same way from every CLI, on a laptop or under `ray job submit`."""
from __future__ import annotations

import logging
import os
import platform
import signal
import sys
import threading

from hnm_ray.core.errors import ConfigError

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
    stop_cleanly_on_signals()


STOP_HINT = ("finished stages and written features are kept. Continue with `python -m hnm_ray.train --resume RUN` "
             "(RUN: the run folder logged at the start; predict and extract: run the same command again)")
STOPPED_BY = {signal.SIGTERM: "SIGTERM (a preemption or `ray job stop`)", signal.SIGINT: "Ctrl-C (SIGINT)"}


def stop_cleanly_on_signals() -> None:
    """In a driver's main thread (after ray.init, whose handlers it replaces): SIGTERM (a spot preemption, `ray job
    stop`, a scheduler's kill) or Ctrl-C ends the process with one line saying how to continue and exit code 128 +
    the signal (143, 130). Without it Ray dumps a stack (a ~50-line KeyboardInterrupt traceback on Ctrl-C) and the
    interpreter's shutdown can abort (SIGABRT) in a decoder thread. Nothing is lost: every stage writes its outputs
    atomically and `state.json` records the finished ones, as after a SIGKILL."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum: int, frame: object) -> None:
        log.error("received %s: the job stops now; %s", STOPPED_BY[signal.Signals(signum)], STOP_HINT)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(128 + signum)  # no interpreter shutdown: Ray's and cuCIM's threads cannot abort it

    for signum in STOPPED_BY:
        signal.signal(signum, stop)


def live_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU, memory in bytes, ...) of each live node of the connected Ray cluster."""
    import ray

    return [node["Resources"] for node in ray.nodes() if node["Alive"]]


def node_cpus() -> list[float]:
    """The CPUs of each live node of the connected Ray cluster."""
    return [node.get("CPU", 0.0) for node in live_nodes()]


def single_node() -> bool:
    """Whether Ray runs on one node (a laptop, one VM): a stage may then run in the driver's process instead of
    starting Ray workers for it."""
    return len(node_cpus()) <= 1


def cluster_gpus() -> float:
    """GPUs the connected Ray cluster has (0 on CPU-only machines)."""
    import ray

    return float(ray.cluster_resources().get("GPU", 0.0))


def torch_device(use_gpu: bool, key: str) -> str:
    """The torch device to use inside a task: explicit, since tasks with num_gpus=0 may still see GPUs. A task asked
    to use a GPU (config key `key`) where torch sees none refuses: it would hold its GPU and compute on the CPU."""
    import torch

    if not use_gpu:
        return "cpu"
    if not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        raise ConfigError(key, f"asks for a GPU, but torch {torch.__version__} ({build}) sees none on node "
                               f"{platform.node()} (torch.cuda.is_available() is False). Install the GPU stack of "
                               "constraints/gpu.txt on GPU nodes (a CUDA torch matching the driver), or run on CPUs: "
                               f"turn {key} off")
    return "cuda"
