"""Which MIL epoch is kept: validation slide metrics every epoch, the kept-epoch rule (best validation AUC, or the
fixed epoch when the validation split is too small), the update gate's best validation F1, and the official
protocol's best-TEST-epoch report; `hnm_ray.training.mil`'s loop calls them every epoch."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from hnm_ray.models.inference import _tensor, evaluate_bags
from hnm_ray.store.features import Bag


def validation_metrics(model, bags: Iterable[Bag], loss_fn, device: str = "cpu",
                       threshold: float | None = None) -> dict[str, float]:
    """Slide metrics (at `threshold`; None: the Youden threshold on these bags) and mean loss on validation bags
    (an iterator is consumed one bag at a time); `loss_fn(bag_logits, max_instance_logits, labels)` gives one loss
    per bag (`losses.bags_bce`)."""
    import torch

    from hnm_ray.models.metrics import slide_metrics

    model.eval()
    bag_logits, max_logits, labels = [], [], []
    with torch.no_grad():
        for bag in bags:  # one forward per bag gives its probability and its loss terms
            inst, bag_logit = model(_tensor(bag, device))
            bag_logits.append(bag_logit.reshape(()))
            max_logits.append(inst.max())
            labels.append(bag.label)
        if not labels:
            return {}
        bag_logits, max_logits = torch.stack(bag_logits), torch.stack(max_logits)
        labels = np.asarray(labels)
        losses = loss_fn(bag_logits, max_logits, torch.as_tensor(labels, dtype=bag_logits.dtype, device=device))
        probs = torch.sigmoid(bag_logits).double().cpu().numpy()
    metrics = {f"val_{k}": v for k, v in slide_metrics(labels, probs, threshold).items()}
    metrics["val_loss"] = float(np.mean(losses.cpu().tolist()))
    return metrics


def _is_better(metrics: dict[str, float], best: dict[str, Any] | None) -> bool:
    if best is None or "val_auc" not in metrics:
        return True  # no validation slides: the last epoch is the model kept
    auc, best_auc = metrics.get("val_auc", float("nan")), best.get("val_auc", float("nan"))
    auc = -1.0 if math.isnan(auc) else auc
    best_auc = -1.0 if math.isnan(best_auc) else best_auc
    return auc > best_auc or (auc == best_auc and metrics.get("val_loss", 0.0) < best.get("val_loss", math.inf))


def best_val_f1(history: list[dict[str, Any]]) -> float:
    """The best validation F1 over all MIL epochs (0 at least), the update gate's input as officially (trainer.py
    309-312: `optimal_ac_val` starts at 0 and takes every better epoch); nan without validation slides."""
    scores = [h["val_f1"] for h in history if not math.isnan(h.get("val_f1", math.nan))]
    return max([0.0, *scores]) if any("val_f1" in h for h in history) else math.nan


def validation_selects(val: list[tuple[str, int]], min_bags: int) -> bool:
    """Whether the validation split is large enough to pick the epoch and threshold on: >= min_bags of each class."""
    return all(sum(y == label for _, y in val) >= min_bags for label in (0, 1))


def _keeps(metrics: dict[str, Any], best: dict[str, Any] | None, mc: dict[str, Any], selects: bool) -> bool:
    """Whether this epoch's model replaces the kept one: best validation AUC (when the validation split `selects`),
    or the fixed epoch (-1: the last)."""
    if mc["select_epoch"] == "fixed" or not selects:
        fixed = mc["fixed_epoch"] if mc["fixed_epoch"] >= 0 else mc["epochs"] - 1
        return metrics["epoch"] <= fixed
    return _is_better(metrics, best)


def official_protocol_update(best: dict[str, Any] | None, model, test_bags: Iterable[Bag], labels: list[int],
                             epoch: int, device: str) -> dict[str, Any] | None:
    """The official code's report: the epoch of best TEST slide AUC, with the Youden threshold picked on test.
    Kept apart from our protocol (epoch and threshold on validation) and labelled so; the kept epoch's metrics carry
    their 95 % intervals. `test_bags` (an iterator is consumed one bag at a time) carry `labels`, in order."""
    from hnm_ray.models.metrics import slide_intervals, slide_metrics

    if not labels:
        return best
    probs, _ = evaluate_bags(model, test_bags, device)
    labels = np.asarray(labels)
    metrics = slide_metrics(labels, probs)
    auc = -1.0 if math.isnan(metrics["auc"]) else metrics["auc"]
    if best is None or auc > best["test_auc"]:
        metrics.update(slide_intervals(labels, probs, metrics["threshold"]))
        return {"epoch": epoch, **{f"test_{k}": v for k, v in metrics.items()}}
    return best
