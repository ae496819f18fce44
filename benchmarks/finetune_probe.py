"""What one fine-tuning round does to the representation: the tile probe AUC of the encoder after a round, for
fine-tuning settings side by side, against the round's starting features (issue 22, part 4).

Takes a finished job's run folder (its config.yaml, round-0 store, state.json and selection_round0: the rows the
product's round 0 would fine-tune on), fine-tunes the round's starting encoder with the product's `round_rows` +
`fit_finetune` under each setting (a nested config override; `"labels": "truth"` replaces the rows' pseudo labels by
the tiles' truth, and `"positives": "truth"` takes every tumour tile of the training slides as the positives (beside
the round's hard negatives): oracles that say whether label noise or the number of correct positives holds the loss
back; `nt_xent` adds a benchmark-only NT-Xent term of that
weight to our loop's loss, `"negative_anchors": false` drops its negatives-as-anchors term, `bce` adds a binary
cross-entropy term of that weight on the projection, alone with `"supcon": false`), and reports the tile probe (benchmarks/representation.py: logistic regression on 8,000
training tiles -> all test tiles) of the fine-tuned encoder, with the starting features' probe as the baseline.

    python -m benchmarks.finetune_probe --run RUN --settings '{"name": "mom0", "finetune": {"momentum": 0.0}}' ...
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from hnm_ray.config import TrainConfig, from_tree, merge
from hnm_ray.config.files import load_yaml
from hnm_ray.store.features import Bag, FeatureStore
from hnm_ray.store.manifest import load_manifest


def with_nt_xent(weight: float, negative_anchors: bool = True):
    """Our loop's loss + `weight` x NT-Xent on the same two views, optionally without the negatives-as-anchors term
    (benchmark-only variants, not product knobs)."""
    import torch

    from hnm_ray.training.losses import supcon_loss
    from hnm_ray.training import finetune

    def loss(batch, model, fc, epoch, ratio, gen, device, supervised, input_space):
        keep = finetune._usable(batch, ratio, supervised)
        z1, z2 = finetune._views(batch["tiles"][keep], model, fc, gen, device, input_space)
        labels, classes = batch["label"][keep], batch["supcon_class"][keep]
        if negative_anchors:
            total = finetune.our_objective(z1, z2, labels, fc, epoch, classes)
        else:  # positives as the only anchors, from the first epoch
            y = torch.from_numpy(labels.astype(np.int64)).to(device)
            same = torch.from_numpy(classes.astype(np.int64)).to(device)
            total = supcon_loss(z1, z2, same, fc["temperature"], anchor_mask=y == 1)
        return total + weight * supcon_loss(z1, z2, None, fc["temperature"])

    return loss


def with_bce(weight: float, supcon: bool = True):
    """Our loop's loss (or none of it, `supcon` False) + `weight` x binary cross-entropy of the rows' labels on the
    projection: logit = <z, w> / temperature for one fixed unit vector w (seeded), which the trainable projection head
    can turn towards the tumour direction (a linear classifier on the projection, with no parameter added to the
    optimiser). Benchmark-only: does a classification loss on the same rows move the representation where SupCon
    does not?"""
    import torch
    import torch.nn.functional as F

    from hnm_ray.training import finetune

    def loss(batch, model, fc, epoch, ratio, gen, device, supervised, input_space):
        keep = finetune._usable(batch, ratio, supervised)
        z1, z2 = finetune._views(batch["tiles"][keep], model, fc, gen, device, input_space)
        labels = batch["label"][keep]
        direction = F.normalize(torch.randn(z1.shape[1], generator=torch.Generator().manual_seed(0)), dim=0).to(z1.device)
        y = torch.from_numpy(labels.astype(np.float32)).to(z1.device)
        logits = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)]) @ direction / fc["temperature"]
        total = weight * F.binary_cross_entropy_with_logits(logits, torch.cat([y, y]))
        return total + finetune.our_objective(z1, z2, labels, fc, epoch, batch["supcon_class"][keep]) if supcon else total

    return loss


class EncodedStore:
    """The round-0 store's tiles seen through another encoder: bags re-encoded from the slides on read (the read_bag
    that representation.tile_probe uses; not a store on disk)."""

    def __init__(self, store: FeatureStore, encoder, records, tile_size: int) -> None:
        self.store, self.encoder, self.tile_size = store, encoder, tile_size
        self.paths = {r.slide_id: r.path for r in records}

    def read_bag(self, slide_id: str, label: int | None = None) -> Bag:
        import torch

        from hnm_ray.models.encoders import to_model_input
        from hnm_ray.slides.reader import open_slide

        bag = self.store.read_bag(slide_id, label)
        with open_slide(self.paths[slide_id], slide_id=slide_id, device="cpu") as reader:
            pixels = np.asarray(reader.read_tiles(bag.coords, self.tile_size, level=0)).copy()
        with torch.no_grad():
            features = self.encoder(to_model_input(torch.from_numpy(pixels))).numpy()
        return Bag(slide_id, features, bag.tile_ids, bag.coords, bag.truth, label)


def with_truth_labels(rows, store: FeatureStore):
    """The rows with their pseudo label replaced by the tile's truth (an oracle setting, benchmark-only)."""
    import pyarrow as pa

    truth = {}
    for slide_id in sorted(set(rows["slide_id"].to_pylist())):
        table = store.read_table(slide_id, columns=["tile_id", "truth"])
        truth.update(((slide_id, t), int(y)) for t, y in zip(table["tile_id"].to_pylist(), table["truth"].to_pylist()))
    labels = [truth[key] for key in zip(rows["slide_id"].to_pylist(), rows["tile_id"].to_pylist())]
    return rows.set_column(rows.schema.get_field_index("label"), "label", pa.array(labels, pa.int8()))


def truth_positive_rows(config: TrainConfig, store: FeatureStore, records, selection):
    """The round's hard negatives + every tumour tile (truth 1) of the training slides as positives (an oracle,
    benchmark-only; pos_rank 0 so that every epoch's r_t keeps them)."""
    import pyarrow as pa

    from hnm_ray.training import finetune_rows
    from hnm_ray.training.official_steps import HARD_NEGATIVE, POSITIVE

    ids, tiles = [], []
    for record in records:
        if record.split == "train" and record.label == 1:
            table = store.read_table(record.slide_id, columns=["tile_id", "truth"])
            chosen = np.asarray(table["tile_id"])[np.asarray(table["truth"]) == 1]
            ids += [record.slide_id] * len(chosen)
            tiles += chosen.tolist()
    positives = pa.table({"slide_id": pa.array(ids, pa.string()), "tile_id": pa.array(tiles, pa.int32()),
                          "pos_rank": pa.array(np.zeros(len(ids), np.float32)),
                          "score": pa.array(np.ones(len(ids), np.float32))})
    hard = selection.hard_negatives.select(["slide_id", "tile_id"])
    return finetune_rows.tile_rows(store, records, [(hard, HARD_NEGATIVE), (positives, POSITIVE)], config.run.seed)


def main() -> None:
    from benchmarks.representation import tile_probe
    from hnm_ray.run.cluster import init_ray
    from hnm_ray.models.encoders import config_tag, encoder_from_config
    from hnm_ray.mining.pseudo_labels import Selection
    from hnm_ray.training import finetune, finetune_rows

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished job's run folder (round 0 mined)")
    parser.add_argument("--settings", nargs="+", required=True,
                        help='JSON objects: {"name": N, <config override>..., "nt_xent": W (optional)}')
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    run = Path(args.run)
    tree = load_yaml(run / "config.yaml")
    base = from_tree(TrainConfig, tree)
    records = load_manifest(base.run.manifest, seed=base.run.seed)
    state = json.loads((run / "state.json").read_text())
    weights = json.loads((run / "metrics_round0.json").read_text())["encoder_weights"]  # round 0's encoder
    store0 = FeatureStore(Path(base.run.store) if base.run.store else run / "features",
                          config_tag(base.encoder, weights), round=0)
    selection = Selection.load(run / "selection_round0", state["mining_round0"]["stats"])
    head = str(Path(weights).with_name(Path(weights).name.removesuffix(".safetensors") + ".head.pt"))
    init_ray()
    started = time.perf_counter()
    baseline = tile_probe(store0, records, seed=base.run.seed)
    results, loss = [], finetune.our_loss
    for setting in map(json.loads, args.settings):
        name, nt_xent = setting.pop("name"), setting.pop("nt_xent", 0.0)
        negative_anchors = setting.pop("negative_anchors", True)
        bce, supcon = setting.pop("bce", 0.0), setting.pop("supcon", True)
        labels, positives = setting.pop("labels", "pseudo"), setting.pop("positives", "mined")
        config = from_tree(TrainConfig, merge(tree, setting))
        rows = (truth_positive_rows(config, store0, records, selection) if positives == "truth"
                else finetune_rows.round_rows(config, store0, records, selection, 0, False))
        if labels == "truth":
            rows = with_truth_labels(rows, store0)
        positive_count = int(np.sum(np.asarray(rows["label"]) == 1))
        finetune.our_loss = (with_bce(bce, supcon) if bce else
                             with_nt_xent(nt_xent, negative_anchors) if nt_xent or not negative_anchors else loss)
        t0 = time.perf_counter()
        out = finetune.fit_finetune(config, rows, weights, run / "finetune_probe" / name, name="ft", first_epoch=0,
                                    last_epoch=config.finetune.epochs_per_round,
                                    total_epochs=config.total_finetune_epochs, head_weights=head)
        seconds = time.perf_counter() - t0
        finetune.our_loss = loss
        encoder = encoder_from_config(config.encoder, out.encoder_weights).eval()
        probe = tile_probe(EncodedStore(store0, encoder, records, config.tiling.tile_size), records, seed=config.run.seed)
        results.append({"name": name, "override": setting, "labels": labels, "positive_rows": positives, "positives": positive_count,
                        "nt_xent": nt_xent, "negative_anchors": negative_anchors, "bce": bce, "supcon": supcon, "rows": rows.num_rows, **probe,
                        "probe_ratio_vs_round0": probe["probe_auc"] / baseline["probe_auc"],
                        "finetune_seconds": seconds, "ft_loss_last_epoch": out.history[-1].get("ft_loss")})
        print(json.dumps(results[-1]), flush=True)
    line = {"benchmark": "finetune_probe", "run": str(run), "round0": baseline, "settings": results,
            "seconds": time.perf_counter() - started}
    print(json.dumps(line))
    if args.out:
        Path(args.out).write_text(json.dumps(line, indent=1) + "\n")


if __name__ == "__main__":
    main()
