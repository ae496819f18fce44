"""`mil.ensemble`: a round's K aggregators, trained at once as Ray tasks where they can be, combined into one model
(`models.ensemble`) with a validation threshold and validation metrics of its own (the members' are each one draw's)."""
from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from hnm_ray.config import MILConfig
from hnm_ray.core.errors import HnmError
from hnm_ray.models.ensemble import AggregatorEnsemble
from hnm_ray.models.inference import evaluate_bags, load_aggregator, read_bags, save_aggregator, split_records
from hnm_ray.models.metrics import FALLBACK_THRESHOLD, slide_metrics
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training.mil import MILResult, Standardisation, fit_member
from hnm_ray.training.mil_validation import validation_selects

log = logging.getLogger("hnm_ray")


def in_tasks(config: MILConfig) -> bool:
    """Whether the members train at once as Ray tasks: with Ray up, mil.ensemble > 1 and in-driver MIL (mil.workers
    0; with workers each member is a Ray Train worker group, trained one after another), and not inside a Ray Tune
    trial (a placement group): its CPUs are held by the trial, and tasks outside it could wait on a cluster the
    sweep's trials reserve whole."""
    if config.ensemble == 1 or config.workers > 0:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_placement_group_id() is None


def fit_members(config: MILConfig, store: FeatureStore, records: list[SlideRecord], run_dir: str | Path, name: str,
                miner_name: str | None, seed: int, statistics: Standardisation | None = None) -> list[MILResult]:
    """The ensemble's K members (`fit_member` runs `{name}_member{i}`, seed seed + i): one Ray task each, as many
    at once as the cluster has mil.cpus_per_worker CPUs (and a GPU each with mil.use_gpu) for (`in_tasks`), else
    one after another in this process. A member is the same either way (its seed, its code, its torch threads); a
    task retried after a lost worker (mil.max_failures) resumes from the member's own checkpoint. `statistics`: the
    training split's standardisation, computed once by the caller (`mil.shared_standardisation`) for every member."""
    runs = [(f"{name}_member{i}", seed + i) for i in range(config.ensemble)]
    if not in_tasks(config):
        members = []
        for i, (member, member_seed) in enumerate(runs):
            log.info("MIL: aggregator %d of %d (mil.ensemble, seed %d)", i + 1, config.ensemble, member_seed)
            members.append(fit_member(config, store, records, run_dir, member, miner_name, member_seed, statistics))
        return members
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from hnm_ray.run.run_folder import remote_of

    run_dir = Path(run_dir).resolve()  # a task's working directory is not the driver's
    # A run folder staged from object storage is on the driver's disk only: its members train on the driver's node.
    where = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False) \
        if remote_of(run_dir) else "DEFAULT"
    task = ray.remote(_member_task).options(num_cpus=config.cpus_per_worker, num_gpus=1 if config.use_gpu else 0,
                                            max_retries=config.max_failures, scheduling_strategy=where)
    refs = {task.remote(config, store, records, run_dir, member, miner_name, member_seed, statistics): i
            for i, (member, member_seed) in enumerate(runs)}
    log.info("MIL: started the %d aggregators of mil.ensemble as Ray tasks (seeds %d-%d, %g CPUs%s each; as many "
             "at once as the cluster has room for)", config.ensemble, seed, seed + config.ensemble - 1,
             config.cpus_per_worker, " + 1 GPU" if config.use_gpu else "")
    members: dict[int, MILResult] = {}
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = refs[ready[0]]
            members[i], pid, node = _task_result(ready[0], runs[i][0])
            log.info("MIL: aggregator %d of %d finished (seed %d, best epoch %d; Ray task in process %d on %s), %d "
                     "to go", i + 1, config.ensemble, runs[i][1], members[i].best_epoch, pid, node, len(pending))
    finally:
        for ref in pending:  # a member failed: the others stop (each resumes from its checkpoint on the next run)
            ray.cancel(ref)
    return [members[i] for i in range(config.ensemble)]


def _member_task(config: MILConfig, store: FeatureStore, records: list[SlideRecord], run_dir: Path, name: str,
                 miner_name: str | None, seed: int, statistics: Standardisation | None) -> tuple[MILResult, int, str]:
    """`fit_member` in a Ray task, and the process and node it ran in (the driver logs them)."""
    import ray

    member = fit_member(config, store, records, run_dir, name, miner_name, seed, statistics)
    return member, os.getpid(), ray.util.get_node_ip_address()


def _task_result(ref, name: str) -> tuple[MILResult, int, str]:
    """A member task's result; its failure as our own error (an HnmError as raised in the task, with its message),
    not Ray's wrapper."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, HnmError):
            raise exc.cause from None
        raise HnmError(f"MIL training of {name} failed in its Ray task: {type(exc.cause).__name__}: {exc.cause}") \
            from exc
    except ray.exceptions.RayError as exc:  # its worker or node lost more often than mil.max_failures, cancelled, ...
        raise HnmError(f"MIL training of {name} failed: {exc}. Run again (--resume): it continues from its last "
                       "checkpoint") from exc


def combine_members(members: list[MILResult], config: MILConfig, store: FeatureStore, records: list[SlideRecord],
                    path: Path) -> MILResult:
    """Save the members as one `AggregatorEnsemble` at `path` (safetensors + JSON) and return it as the round's
    model: its threshold is the Youden threshold of its own validation probabilities (0.5 when the validation split
    has fewer than mil.min_val_bags of a class), its val_* metrics its own, its epoch the members' median; the
    official protocol's numbers are the members' means."""
    loaded = [load_aggregator(member.model_path, config.aggregator) for member in members]
    model = AggregatorEnsemble([aggregator for aggregator, _ in loaded])
    val = split_records(store, records, "val")
    metrics: dict[str, Any] = {}
    threshold = FALLBACK_THRESHOLD
    if val:
        probs, _ = evaluate_bags(model, read_bags(store, val))
        selects = validation_selects([(r.slide_id, int(r.label)) for r in val], config.min_val_bags)
        metrics = {f"val_{k}": v for k, v in slide_metrics([r.label for r in val], probs,
                                                            None if selects else FALLBACK_THRESHOLD).items()}
        threshold = metrics["val_threshold"]
        metrics["val_best_f1"] = metrics["val_f1"]  # the update gate's input: the ensemble's F1 at its threshold
    losses = [m.metrics["val_loss"] for m in members if "val_loss" in m.metrics]
    if losses:
        metrics["val_loss"] = float(np.mean(losses))
    epochs = [member.best_epoch for member in members]
    metrics["val_auc_members"] = [m.metrics.get("val_auc") for m in members]
    meta = {**loaded[0][1], "members": len(members), "threshold": threshold, "epoch": statistics.median_low(epochs),
            "member_epochs": epochs}
    model_path = save_aggregator(path, model.state_dict(), meta)
    return MILResult(str(model_path), meta["epoch"], threshold, metrics, members[0].history,
                     mean_official_protocol([member.official_protocol for member in members]))


def mean_official_protocol(reports: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The members' official-protocol reports (best TEST epoch each) as their means, and how many were averaged."""
    if not reports or any(report is None for report in reports):
        return None
    keys = [k for k, v in reports[0].items() if isinstance(v, (int, float))]
    return {**{k: float(np.mean([report[k] for report in reports])) for k in keys}, "members": len(reports)}
