"""A trained aggregator as a user shares it, and what it computes.

Model files run no code: weights are safetensors, everything else (architecture, dims, feature
statistics, threshold, epoch, encoder tag) is a JSON file beside them; nothing is unpickled.
Bag and tile probabilities and split evaluation live here, used by training, scoring and predict.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from hnm_ray.core import storage
from hnm_ray.config.sections import TRUST_PLUGINS_FLAG, MILConfig
from hnm_ray.core.errors import ModelFileError
from hnm_ray.core.registry import names_code
from hnm_ray.store.features import Bag, FeatureStore
from hnm_ray.store.manifest import SlideRecord

WEIGHTS_SUFFIX = ".safetensors"
META_SUFFIX = ".json"


def save_aggregator(path: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write `<path>.safetensors` (weights) and `<path>.json` (the rest); returns the safetensors path."""
    from safetensors.torch import save

    stem = _stem(path)
    weights = stem.with_name(stem.name + WEIGHTS_SUFFIX)
    storage.write_bytes(save({k: v.detach().cpu().contiguous() for k, v in state.items()}), weights)
    storage.write_bytes(json.dumps(meta, indent=2, default=float), stem.with_name(stem.name + META_SUFFIX))
    return weights


def _stem(path: str | Path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix in (WEIGHTS_SUFFIX, META_SUFFIX, ".pt") else path


def load_aggregator(path: str | Path, plugin: str | None = None,
                    eval_chunk: int | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The aggregator saved by `save_aggregator` (eval mode, with its feature standardisation) and its JSON fields;
    `eval_chunk` (mil.eval_chunk_tiles, a memory setting of the machine that scores) replaces the saved one when given.

    A JSON with `members` (`mil.ensemble`) describes an `AggregatorEnsemble` of that many such aggregators.
    Pickled checkpoints (`.pt`, older runs) are refused: unpickling a file from someone else can run code. A JSON
    naming a `module:callable` plug-in is refused unless it is `plugin`, the one the caller's checked config names
    (a plug-in named on the command line, or trusted with --trust-plugins): a shared file must not run code.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from hnm_ray.models.aggregators import build_standardized
    from hnm_ray.models.ensemble import AggregatorEnsemble

    stem = _stem(path)
    weights, meta_path = stem.with_name(stem.name + WEIGHTS_SUFFIX), stem.with_name(stem.name + META_SUFFIX)
    if Path(path).suffix == ".pt" or not weights.is_file():
        raise ModelFileError(f"{path}: no {weights.name} + {meta_path.name} pair found. hnm-ray loads models "
                                        "only as safetensors + JSON (a pickled .pt file can run code when loaded); "
                                        "runs made before this format must be trained again (or re-run "
                                        "`python -m hnm_ray.train --resume RUN`, which rewrites the model files)")
    try:
        meta = json.loads(meta_path.read_text())
        state = load_file(str(weights))
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFileError(f"{weights} / {meta_path.name} cannot be read as an hnm-ray aggregator "
                                        f"(safetensors weights + JSON): {exc}") from exc
    if names_code(str(meta["aggregator"])) and meta["aggregator"] != plugin:
        raise ModelFileError(f"{meta_path} names the aggregator plug-in {meta['aggregator']!r}, which would run code, "
                             f"and the config names {plugin or 'no plug-in'}: name it on the command line "
                             f"(--mil.aggregator {meta['aggregator']}) or add {TRUST_PLUGINS_FLAG} if you trust "
                             f"the folder")
    chunk = meta.get("eval_chunk_tiles", MILConfig.eval_chunk_tiles) if eval_chunk is None else eval_chunk
    count = meta.get("members", 1)
    if not isinstance(count, int) or count < 1:
        raise ModelFileError(f"{meta_path}: 'members' must be a positive whole number (the ensemble's size), not "
                             f"{count!r}")
    members = [build_standardized(meta["aggregator"], meta["dim"], embed=meta.get("embed", 0), eval_chunk=chunk,
                                  hidden=meta["hidden"], dropout=meta["dropout"]) for _ in range(count)]
    model = members[0] if "members" not in meta else AggregatorEnsemble(members)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{weights} does not hold the aggregator {meta_path.name} describes: {exc}") from exc
    return model.eval(), meta


def _tensor(bag: Bag, device: str) -> torch.Tensor:
    return torch.from_numpy(bag.features).to(device)


def evaluate_bags(model, bags: Iterable[Bag], device: str = "cpu") -> tuple[np.ndarray, list[np.ndarray]]:
    """Bag probabilities and per-bag instance logits of `bags` under `model` (eval mode, no grad); an iterator of
    bags is consumed one bag at a time (only the logits are kept)."""
    model.eval()
    probs, instance_logits = [], []
    with torch.no_grad():
        for bag in bags:
            inst, bag_logit = model(_tensor(bag, device))
            probs.append(torch.sigmoid(bag_logit).item())
            instance_logits.append(inst.float().cpu().numpy())
    return np.asarray(probs, dtype=np.float64), instance_logits


def instance_logits(model, features: torch.Tensor) -> torch.Tensor:
    """Instance logits of tiles (N, D) from any mix of slides: the instance branch alone, never the bag branch."""
    with torch.no_grad():
        return model.instance_logits(features).float()


def split_records(store: FeatureStore, records: list[SlideRecord], split: str | None,
                  labelled: bool = True) -> list[SlideRecord]:
    """The records of `split` (None: all) that are in the store (and labelled, when asked)."""
    done = store.completed()
    return [r for r in records
            if (split is None or r.split == split) and r.slide_id in done and (r.label is not None or not labelled)]


def read_bags(store: FeatureStore, records: list[SlideRecord]) -> Iterator[Bag]:
    """The bags of `records`, read one at a time as they are iterated: a split of any size is never held whole."""
    return (store.read_bag(r.slide_id, label=r.label) for r in records)


def evaluate_split(model_path: str | Path, store: FeatureStore, records: list[SlideRecord], split: str,
                   threshold: float | None = None, plugin: str | None = None) -> dict[str, float]:
    """Slide metrics (at `threshold`, default the saved validation threshold) with n and 95 % intervals, and instance
    metrics on a split (`plugin`: see `load_aggregator`)."""
    from hnm_ray.models.metrics import instance_metrics, with_intervals

    model, meta = load_aggregator(model_path, plugin)
    chosen = split_records(store, records, split)
    if not chosen:
        return {}
    probs, inst = evaluate_bags(model, read_bags(store, chosen))
    labels = np.asarray([r.label for r in chosen])
    out = with_intervals(labels, probs, threshold if threshold is not None else meta["threshold"])
    truth = np.concatenate([store.read_table(r.slide_id, columns=["truth"]).column("truth").to_numpy().astype(np.int8)
                            for r in chosen if r.label == 1] or [np.zeros(0, np.int8)])
    scores = np.concatenate([s for s, y in zip(inst, labels) if y == 1] or [np.zeros(0)])
    instance = instance_metrics(truth, scores)
    out.update(instance_auc=instance["instance_auc"], instance_auprc=instance["instance_auprc"], instance_n=instance["n"])
    return {f"{split}_{k}": v for k, v in out.items()}


def tile_threshold(model_path: str | Path, store: FeatureStore, records: list[SlideRecord],
                   split: str = "val", plugin: str | None = None) -> float:
    """The tile score from which a tile counts as tumour: the Youden threshold, over the slides of `split`, of each
    slide's top tile score (sigmoid of its largest instance logit, the instance branch's slide call), so a tile at or
    above it would by itself call its slide tumour. 0.5 when the split lacks a class."""
    from hnm_ray.models.metrics import FALLBACK_THRESHOLD, youden_threshold

    model, _ = load_aggregator(model_path, plugin)
    chosen = split_records(store, records, split)
    if not chosen:
        return FALLBACK_THRESHOLD
    _, logits = evaluate_bags(model, read_bags(store, chosen))
    top = np.asarray([float(tile_probabilities(s).max()) if s.size else 0.0 for s in logits])
    return youden_threshold(np.asarray([r.label for r in chosen]), top)


def split_probabilities(model_path: str | Path, store: FeatureStore, records: list[SlideRecord],
                        split: str | None, plugin: str | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(labels (-1 unknown), slide probabilities, slide ids) of the records of `split` (None: all) in the store."""
    model, _ = load_aggregator(model_path, plugin)
    chosen = split_records(store, records, split, labelled=False)
    probs, _ = evaluate_bags(model, read_bags(store, chosen))
    labels = np.asarray([-1 if r.label is None else r.label for r in chosen])
    return labels, probs, [r.slide_id for r in chosen]


def tile_scores(model, store: FeatureStore, slide_id: str) -> tuple[pa.Table, float]:
    """A slide's tile table (tile_id, x, y, level, size, logit, score) and its bag probability."""
    bag = store.read_bag(slide_id)
    with torch.no_grad():
        inst, bag_logit = model(torch.from_numpy(bag.features))
    logits = inst.float().numpy()
    table = store.read_table(slide_id, columns=["tile_id", "x", "y", "level", "size"])
    table = table.append_column("logit", pa.array(logits.astype(np.float32)))
    table = table.append_column("score", pa.array(tile_probabilities(logits)))
    return table, float(torch.sigmoid(bag_logit))


def tile_probabilities(logits: np.ndarray) -> np.ndarray:
    """Tile scores (float32 sigmoid) of instance logits: the one formula behind tile tables and the tile threshold."""
    return (1 / (1 + np.exp(-np.asarray(logits, np.float32)))).astype(np.float32)
