"""How many SimCLR epochs make a useful warm start? Measured on the digits cohort, in one process (prints one JSON line).

The pipeline's own pieces (small_cnn encoder, projection head, our augmentations, NT-Xent = `supcon_loss` without
labels, SGD + cosine as in `pretrain.method simclr`) train on random training tiles; after each checkpoint epoch a
linear probe (logistic regression on the frozen 128-d features of training tiles, tumour digit vs the rest) is
scored on test-slide tiles: instance AUC, against the same probe on the random-init encoder (epoch 0) in this run.

    python -m benchmarks.warm_start --epochs 0 2 5 10 20 --seeds 0 1 2 --out benchmarks/results/warm_start.json
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from hnm_ray.augment import AugmentConfig, two_views
from hnm_ray.losses import supcon_loss
from hnm_ray.models.encoders import build_encoder, to_model_input
from hnm_ray.run_folder import cache_dir
from hnm_ray.slides.reader import open_slide
from hnm_ray.store.manifest import load_manifest
from hnm_ray.training.finetune import contrastive_model, projection_head


def cohort_tiles(folder: Path, tile: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (uint8 tiles (N, tile, tile, 3), is-tumour (N,))} of every tissue tile of the digits cohort."""
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


def probe_auc(encoder, data: dict, n_train: int, seed: int) -> float:
    """Test AUC of a logistic-regression probe (tumour vs rest) trained on `n_train` training tiles' features."""
    rng = np.random.default_rng(seed)
    train_x, train_y = data["train"]
    pick = rng.choice(len(train_x), min(n_train, len(train_x)), replace=False)
    scale = features(encoder, train_x[pick])
    mean, std = scale.mean(0), scale.std(0) + 1e-6
    probe = LogisticRegression(max_iter=2000, class_weight="balanced").fit((scale - mean) / std, train_y[pick])
    test_x, test_y = data["test"]
    return float(roc_auc_score(test_y, probe.decision_function((features(encoder, test_x) - mean) / std)))


def simclr(data: dict, epochs: list[int], seed: int, n_tiles: int, batch: int, lr: float, n_probe: int) -> dict:
    """Probe AUC after each epoch in `epochs` (0 = random init) of SimCLR on `n_tiles` random training tiles."""
    torch.manual_seed(seed)
    encoder = build_encoder("small_cnn")
    model = contrastive_model(encoder, projection_head(encoder.out_dim, 256))
    last = max(epochs)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: 0.5 * (1 + math.cos(math.pi * e / max(1, last))))
    rng = np.random.default_rng(seed)
    train_x = data["train"][0]
    sample = train_x[rng.choice(len(train_x), min(n_tiles, len(train_x)), replace=False)]
    gen = torch.Generator().manual_seed(seed)
    out = {0: {"probe_auc": probe_auc(encoder, data, n_probe, seed), "loss": float("nan")}} if 0 in epochs else {}
    for epoch in range(1, last + 1):
        model.train()
        losses = []
        for i in rng.permutation(len(sample) // batch):
            tiles = torch.from_numpy(sample[i * batch:(i + 1) * batch])
            v1, v2 = two_views(tiles, AugmentConfig(), gen)
            loss = supcon_loss(model(to_model_input(v1)), model(to_model_input(v2)), None, 0.07)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        schedule.step()
        if epoch in epochs:
            out[epoch] = {"probe_auc": probe_auc(encoder, data, n_probe, seed), "loss": float(np.mean(losses))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cohort", default="", help="digits cohort folder (default: generate 160 slides, 64 px)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[0, 2, 5, 10, 20])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--tiles", type=int, default=4096, help="SimCLR training tiles (pretrain.tiles)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--probe-tiles", type=int, default=4000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    torch.set_num_threads(2)
    folder = Path(args.cohort) if args.cohort else cache_dir(__import__("hnm_ray.config", fromlist=["JobConfig"]).JobConfig()) / "digits-n160-px64-seed0"
    if not (folder / "manifest.csv").exists():
        from benchmarks.cohorts.digits import DigitsConfig, make_digits_cohort

        make_digits_cohort(folder, DigitsConfig(tile_px=64))
    started = time.perf_counter()
    data = cohort_tiles(folder, 64)
    runs = {seed: simclr(data, args.epochs, seed, args.tiles, args.batch, args.lr, args.probe_tiles)
            for seed in args.seeds}
    table = {}
    for epoch in args.epochs:
        aucs = [runs[s][epoch]["probe_auc"] for s in args.seeds]
        table[epoch] = {"probe_auc_mean": float(np.mean(aucs)), "probe_auc_sd": float(np.std(aucs, ddof=1)),
                        "loss_mean": float(np.nanmean([runs[s][epoch]["loss"] for s in args.seeds]))}
    base = table[min(args.epochs)]["probe_auc_mean"]
    line = {"benchmark": "warm_start", "cohort": str(folder.name), "seeds": args.seeds, "tiles": args.tiles,
            "batch": args.batch, "lr": args.lr, "table": table,
            "ratio_vs_random_init": {e: t["probe_auc_mean"] / base for e, t in table.items()},
            "tiles_by_split": {k: int(len(v[1])) for k, v in data.items()}, "seconds": time.perf_counter() - started}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
