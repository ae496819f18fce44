"""Is the SimCLR warm start's feature space more separable than the tiles' raw pixels? One process, one JSON line.

The pipeline's own pieces (small_cnn encoder, projection head, our augmentations, NT-Xent = `supcon_loss` without
labels, SGD at `pretrain.lr` / `pretrain.momentum` + the fine-tuning schedule, as `pretrain.method simclr` trains)
train on random training tiles of a cohort
(default: the Camelyon16-regime cohort, benchmarks/cohorts/camelyon.py, 64 px tiles, or a cohort folder) with one or more recipes
(`default:` = today's product defaults, others override them). After the last epoch (and each --checkpoints epoch,
0 = random init) a linear probe (logistic regression on the frozen, standardised features of training tiles, tumour
digit vs the rest, tile labels) is scored on every test-slide tile: instance AUC. Baseline in the same run: the same
probe on the same tiles' raw pixels (grey, 28x28).

    python -m benchmarks.warm_start --recipes default: crop08:crop=0.8/1 --seeds 0 1 2 --jobs 6 \
        --out benchmarks/results/warm_start.json
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from benchmarks.cohorts import COHORTS, cached_cohort
from hnm_ray.training.augment import AugmentConfig, two_views
from hnm_ray.config import FinetuneConfig, PretrainConfig
from hnm_ray.training.losses import supcon_loss
from hnm_ray.models.cnn import SMALL_CNN_WIDTHS, SmallCNN
from hnm_ray.models.encoders import to_model_input
from hnm_ray.slides.reader import open_slide
from hnm_ray.store.manifest import load_manifest
from hnm_ray.training.contrastive import contrastive_model, projection_head
from hnm_ray.training.finetune import optimizer_for
from hnm_ray.training.schedules import scheduler


def cohort_tiles(folder: Path, tile: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 tiles (N, tile, tile, 3), is-tumour (N,))} of every tissue tile of a digits-rendered cohort."""
    meta = json.loads(pq.read_schema(folder / "tiles.parquet").metadata[b"config"])
    table = pq.read_table(folder / "tiles.parquet")
    split_of = {r.slide_id: r.split for r in load_manifest(folder / "manifest.csv")}
    out: dict[str, list] = {}
    for record in load_manifest(folder / "manifest.csv"):
        rows = table.filter(pc.equal(table["slide_id"], record.slide_id))
        coords = np.stack([rows["x"].to_numpy(), rows["y"].to_numpy()], axis=1)
        with open_slide(record.path, slide_id=record.slide_id, device="cpu") as reader:
            pixels = np.asarray(reader.read_tiles(coords, tile, level=0)).copy()
        labels = rows["digit"].to_numpy() == meta["tumour"]
        out.setdefault(split_of[record.slide_id], []).append((pixels, labels))
    return {split: (np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts]))
            for split, parts in out.items()}


def features(encoder, tiles: np.ndarray, batch: int = 512) -> np.ndarray:
    """Frozen encoder features of uint8 tiles."""
    encoder.eval()
    with torch.no_grad():
        return np.concatenate([encoder(to_model_input(torch.from_numpy(tiles[i:i + batch]))).numpy()
                               for i in range(0, len(tiles), batch)])


def probe_auc(featurise, data: dict, n_train: int, seed: int) -> float:
    """Test AUC of a logistic-regression probe (tumour vs rest) trained on `n_train` training tiles' features
    (`featurise`: uint8 tiles -> features), standardised per feature."""
    rng = np.random.default_rng(seed)
    train_x, train_y = data["train"]
    pick = rng.choice(len(train_x), min(n_train, len(train_x)), replace=False)
    scale = featurise(train_x[pick])
    mean, std = scale.mean(0), scale.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit((scale - mean) / std, train_y[pick])
    test_x, test_y = data["test"]
    return float(roc_auc_score(test_y, probe.decision_function((featurise(test_x) - mean) / std)))


@dataclass(frozen=True)
class Recipe:
    """One warm-start recipe: the product's defaults (pretrain, finetune, augment, small_cnn) unless overridden."""

    epochs: int = PretrainConfig().epochs
    tiles: int = PretrainConfig().tiles
    batch: int = FinetuneConfig().batch_size
    lr: float = PretrainConfig().lr
    momentum: float = PretrainConfig().momentum
    temperature: float = FinetuneConfig().temperature
    crop: tuple[float, float] = AugmentConfig().crop_scale
    jitter: float = AugmentConfig().brightness
    orient: str = FinetuneConfig().orientations  # augment.ORIENTATIONS
    widths: tuple[int, ...] = SMALL_CNN_WIDTHS

    @classmethod
    def parse(cls, spec: str) -> tuple[str, Recipe]:
        """"name:key=v,key=v1/v2" (e.g. "crop08:crop=0.8/1,epochs=5") -> (name, recipe); "default:" = the defaults."""
        name, _, knobs = spec.partition(":")
        kwargs: dict = {}
        for item in filter(None, knobs.split(",")):
            key, value = item.split("=")
            default = getattr(cls(), key)
            kwargs[key] = tuple(type(default[0])(v) for v in value.split("/")) if isinstance(default, tuple) \
                else type(default)(value)
        return name, cls(**kwargs)


def raw_pixels(tiles: np.ndarray) -> np.ndarray:
    """The tiles' raw pixels as the probe's features: grey, area-resized to 28x28 (MNIST's own size), 784-d."""
    grey = torch.from_numpy(tiles).float().mul_(torch.tensor([0.299, 0.587, 0.114])).sum(-1)[:, None]
    return torch.nn.functional.adaptive_avg_pool2d(grey, 28).flatten(1).numpy() / 255.0


def simclr(data: dict, recipe: Recipe, checkpoints: list[int], seed: int, n_probe: int) -> dict:
    """Probe AUC after each checkpoint epoch (0 = random init) of SimCLR with `recipe` on random training tiles."""
    torch.manual_seed(seed)
    encoder = SmallCNN(recipe.widths)
    model = contrastive_model(encoder, projection_head(encoder.out_dim, FinetuneConfig().proj_dim))
    last = recipe.epochs
    # the product's optimiser builder, as pretrain_simclr calls it (SGD at the warm start's lr / momentum)
    optimizer = optimizer_for(model.parameters(), {"optimizer": "sgd", "lr": recipe.lr, "momentum": recipe.momentum,
                                                   "weight_decay": FinetuneConfig().weight_decay})
    schedule = scheduler(optimizer, FinetuneConfig().schedule, last, 0)
    rng = np.random.default_rng(seed)
    train_x = data["train"][0]
    sample = train_x[rng.choice(len(train_x), min(recipe.tiles, len(train_x)), replace=False)]
    augment = AugmentConfig(crop_scale=recipe.crop, brightness=recipe.jitter, contrast=recipe.jitter,
                            saturation=recipe.jitter, orientations=recipe.orient)
    gen = torch.Generator().manual_seed(seed)
    probe = lambda tiles: features(encoder, tiles)  # noqa: E731
    out = {0: {"probe_auc": probe_auc(probe, data, n_probe, seed), "loss": float("nan")}} if 0 in checkpoints else {}
    started = time.perf_counter()
    for epoch in range(1, last + 1):
        model.train()
        losses = []
        for i in rng.permutation(len(sample) // recipe.batch):
            tiles = torch.from_numpy(sample[i * recipe.batch:(i + 1) * recipe.batch])
            v1, v2 = two_views(tiles, augment, gen)
            loss = supcon_loss(model(to_model_input(v1)), model(to_model_input(v2)), None, recipe.temperature)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        if epoch in checkpoints or epoch == last:
            out[epoch] = {"probe_auc": probe_auc(probe, data, n_probe, seed), "loss": float(np.mean(losses)),
                          "train_seconds": time.perf_counter() - started}
    return out


def stats(values: list[float]) -> dict:
    """Mean and sample sd (0 for one value)."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


_DATA: dict = {}  # the cohort's tiles, set once by main() before the worker processes fork


def _task(task: tuple) -> float | dict:
    """One seed's raw-pixel probe AUC (recipe None) or SimCLR run, on the tiles in _DATA."""
    name, recipe, seed, args = task
    if recipe is None:
        return probe_auc(raw_pixels, _DATA, args.probe_tiles, seed)
    return simclr(_DATA, recipe, args.checkpoints, seed, args.probe_tiles)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", default="camelyon", help="camelyon (default), digits, or a cohort folder")
    parser.add_argument("--recipes", nargs="+", default=["default:"],
                        help='recipes "name:key=value,..." over the product defaults (keys: Recipe fields; tuples '
                             'as a/b); "default:" is today\'s product warm start')
    parser.add_argument("--checkpoints", type=int, nargs="+", default=[0], help="extra epochs to probe (0 = init)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--probe-tiles", type=int, default=8000, help="training tiles the probe is fitted on")
    parser.add_argument("--jobs", type=int, default=1, help="processes running the seeds' runs side by side")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    folder = cached_cohort(args.cohort) if args.cohort in COHORTS else Path(args.cohort)
    started = time.perf_counter()
    global _DATA
    _DATA = cohort_tiles(folder, 64)
    recipes = dict(Recipe.parse(spec) for spec in args.recipes)
    tasks = [(None, None, seed, args) for seed in args.seeds]
    tasks += [(name, recipe, seed, args) for name, recipe in recipes.items() for seed in args.seeds]
    torch.set_num_threads(max(1, 2 // args.jobs))
    if args.jobs > 1:  # forked workers share the tiles copy-on-write
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            results = pool.map(_task, tasks, chunksize=1)
    else:
        results = [_task(task) for task in tasks]
    raw = results[:len(args.seeds)]
    table = {}
    for k, (name, recipe) in enumerate(recipes.items()):
        runs = dict(zip(args.seeds, results[len(args.seeds) * (k + 1):len(args.seeds) * (k + 2)]))
        table[name] = {"recipe": asdict(recipe), "by_epoch": {
            e: {"probe_auc": stats([runs[s][e]["probe_auc"] for s in args.seeds]),
                "per_seed": [round(runs[s][e]["probe_auc"], 4) for s in args.seeds],
                "loss_mean": float(np.mean([runs[s][e]["loss"] for s in args.seeds])) if e else None,
                "train_seconds_mean": float(np.mean([runs[s][e]["train_seconds"] for s in args.seeds])) if e else None}
            for e in sorted(runs[args.seeds[0]])}}
    line = {"benchmark": "warm_start", "cohort": folder.name, "seeds": args.seeds, "probe_tiles": args.probe_tiles,
            "raw_pixels": {"probe_auc": stats(raw), "per_seed": [round(v, 4) for v in raw]}, "recipes": table,
            "tiles_by_split": {k: int(len(v[1])) for k, v in _DATA.items()},
            "positives_by_split": {k: int(v[1].sum()) for k, v in _DATA.items()},
            "seconds": time.perf_counter() - started}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
