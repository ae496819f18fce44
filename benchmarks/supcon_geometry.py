"""What SupCon fine-tuning does to the projection, step by step (issue 22, part 4: why the rounds do not train).

On a finished job's round 0 (its config.yaml, round-0 encoder + SimCLR head, selection_round0) the rows are the
round's hard negatives and every tumour tile of the training slides, labelled by tile TRUTH (the oracle of
`finetune_probe.py`: no label noise, every correct positive). Each setting trains the product's contrastive model
(`build_contrastive`) with the product's two views and `supcon_loss` (negatives as anchors + positives as anchors,
our loop after warm-up) on batches of 64, plain SGD (momentum 0, the default), and records every 10 steps the two
loss terms of the step's batch and, on a fixed evaluation set (512 of the rows, un-augmented, a third tumour):
- the tumour margin: mean cosine of tumour-tumour projection pairs minus that of tumour-normal pairs (> 0: tumour
  tiles sit together, apart from the rest);
- mean over spread: |mean projection| / mean |projection - mean| (large: every projection is the same vector
  plus a little, the collapsed state whose loss is log(2B - 1)).
Settings: {"name": N, "head": "warm"|"fresh", "lr": 0.01, "clip": max grad norm (0: none), "negative_classes": K
(0: one negative class; K: the negatives split into K k-means classes of their round-0 features, the product's
finetune.negative_classes), "steps": 150}.

    python -m benchmarks.supcon_geometry --run RUN --settings '{"name": "default"}' ... [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.finetune_probe import truth_positive_rows
from hnm_ray.config import TrainConfig, from_tree
from hnm_ray.config.files import load_yaml
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import load_manifest

BATCH = 64
EVAL_ROWS = 512
TEMPERATURE = 0.07


def decode_rows(rows, records, tile_size: int) -> np.ndarray:
    """The rows' tiles (N, H, W, 3) uint8, in row order."""
    from hnm_ray.slides.reader import open_slide

    paths = {r.slide_id: r.path for r in records}
    slide_ids, xs, ys = (np.asarray(rows[c].to_pylist()) for c in ("slide_id", "x", "y"))
    tiles = np.zeros((rows.num_rows, tile_size, tile_size, 3), np.uint8)
    for slide_id in sorted(set(slide_ids)):
        at = np.flatnonzero(slide_ids == slide_id)
        with open_slide(paths[slide_id], slide_id=slide_id, device="cpu") as reader:
            tiles[at] = np.asarray(reader.read_tiles(np.stack([xs[at], ys[at]], 1), tile_size, level=0))
    return tiles


def geometry(z, labels) -> dict[str, float]:
    """Tumour margin and mean-over-spread of a batch of projections (see the module docstring)."""
    import torch
    import torch.nn.functional as F

    zn = F.normalize(z, dim=1)
    cos = zn @ zn.T
    tumour, normal = labels == 1, labels == 0
    pairs = tumour[:, None] & tumour[None] & ~torch.eye(len(labels), dtype=torch.bool)
    margin = cos[pairs].mean() - cos[tumour[:, None] & normal[None]].mean()
    mean = z.mean(0)
    return {"tumour_margin": float(margin), "mean_over_spread": float(mean.norm() / (z - mean).norm(dim=1).mean())}


def trajectory(config: TrainConfig, weights: str, head: str, tiles: np.ndarray, rows, store: FeatureStore,
               setting: dict) -> list[dict]:
    """One setting's steps (see the module docstring)."""
    import torch

    from hnm_ray.training.augment import AugmentConfig, two_views
    from hnm_ray.training.losses import supcon_loss
    from hnm_ray.models.encoders import to_model_input
    from hnm_ray.training.contrastive import build_contrastive
    from hnm_ray.training.finetune_rows import negative_classes

    seed = config.run.seed
    torch.manual_seed(seed)
    model = build_contrastive(config.encoder, weights, head if setting.get("head", "warm") == "warm" else None,
                              config.finetune.proj_dim)
    k = int(setting.get("negative_classes", 0))
    labels = np.asarray(rows["label"])
    # finetune.negative_classes: k-means of the negatives' round-0 features (the warm-start encoder's)
    classes = np.asarray((negative_classes(rows, store, k, seed) if k > 1 else rows)["supcon_class"]).astype(np.int64)
    optimiser = torch.optim.SGD(model.parameters(), lr=float(setting.get("lr", 0.01)), momentum=0.0,
                                weight_decay=config.finetune.weight_decay)
    gen, rng, out = torch.Generator().manual_seed(seed), np.random.default_rng(seed), []
    held = np.random.default_rng(seed + 1).choice(len(labels), min(EVAL_ROWS, len(labels)), replace=False)
    held_tiles, held_labels = to_model_input(torch.from_numpy(tiles[held])), torch.from_numpy(labels[held])
    for step in range(int(setting.get("steps", 150)) + 1):
        if step % 10 == 0:  # before the step: step 0 is the starting model
            with torch.no_grad():
                out.append({"step": step, **geometry(model(held_tiles), held_labels)})
        pick = rng.choice(len(labels), BATCH, replace=False)
        v1, v2 = two_views(torch.from_numpy(tiles[pick]), AugmentConfig(orientations=config.finetune.orientations), gen,
                           config.finetune.augment)
        z1, z2 = model(to_model_input(v1)), model(to_model_input(v2))
        y, c = torch.from_numpy(labels[pick].astype(np.int64)), torch.from_numpy(classes[pick])
        negative_term = supcon_loss(z1, z2, c, TEMPERATURE, anchor_mask=y == 0)
        positive_term = supcon_loss(z1, z2, c, TEMPERATURE, anchor_mask=y == 1)
        optimiser.zero_grad()
        (negative_term + positive_term).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(setting.get("clip", 0)) or float("inf"))
        optimiser.step()
        if step % 10 == 0:
            out[-1].update(negative_term=float(negative_term.detach()), positive_term=float(positive_term.detach()),
                           grad_norm=float(grad_norm))
    return out


def main() -> None:
    from hnm_ray.models.encoders import config_tag
    from hnm_ray.mining.pseudo_labels import Selection

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished job's run folder (round 0 mined)")
    parser.add_argument("--settings", nargs="+", required=True, help="JSON objects (see above)")
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    run = Path(args.run)
    config = from_tree(TrainConfig, load_yaml(run / "config.yaml"))
    records = load_manifest(config.run.manifest, seed=config.run.seed)
    state = json.loads((run / "state.json").read_text())
    weights = json.loads((run / "metrics_round0.json").read_text())["encoder_weights"]
    head = str(Path(weights).with_name(Path(weights).name.removesuffix(".safetensors") + ".head.pt"))
    store0 = FeatureStore(Path(config.run.store) if config.run.store else run / "features",
                          config_tag(config.encoder, weights), round=0)
    rows = truth_positive_rows(config, store0, records,
                               Selection.load(run / "selection_round0", state["mining_round0"]["stats"]))
    started = time.perf_counter()
    tiles, labels = decode_rows(rows, records, config.tiling.tile_size), np.asarray(rows["label"])
    results = []
    for setting in map(json.loads, args.settings):
        steps = trajectory(config, weights, head, tiles, rows, store0, setting)
        results.append({**setting, "start": steps[0], "end": steps[-1], "steps": steps})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "steps"}), flush=True)
    line = {"benchmark": "supcon_geometry", "run": str(run), "rows": len(labels), "positives": int(labels.sum()),
            "batch": BATCH, "temperature": TEMPERATURE, "settings": results, "seconds": time.perf_counter() - started}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
