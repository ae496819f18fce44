"""The paper recipe where the pipeline feeds it: our functions joined (rows -> step composition -> tile batches ->
loss; MIL loop -> update gate; checkpoint -> projection head) against a plain restatement of the official code
(winston52/HNM-WSI train/): run.py 177-198 (loaders), trainer.py 586-686 (two steps), 696-750 (r_t, update),
309-336 (gate), 790-821 (SimCLR weights); dataloader_simCLR.py 352-438 (selections); utils.py 25-73 (MIL loss).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from _support import small_config
from test_official_recipe import _official_checkpoint, _reference_supcon

from hnm_ray.training import losses
from hnm_ray.config import EncoderConfig
from hnm_ray.mining.selection import select_positives, uncertain_negatives
from hnm_ray.mining.pseudo_labels import Selection, with_rank
from hnm_ray.store.features import Bag, FeatureStore
from hnm_ray.store.manifest import SlideRecord
from hnm_ray.training import tile_batches
from hnm_ray.training.contrastive import build_contrastive
from hnm_ray.training.finetune import epoch_batches, official_step_loss
from hnm_ray.training.finetune_rows import round_rows
from hnm_ray.training.official_steps import POSITIVE, UNCERTAIN_NEGATIVE, official_ratio

THRESHOLD, BATCH, TILE = 0.3, 64, 16
N_POS_SLIDES, N_NEG_SLIDES, TILES_POS, TILES_NEG = 30, 12, 24, 60


# ---------------------------------------------------------------- the official code, restated

def official_loader_sizes(batch_size: int, posi_batch_ratio: float, posi_query_ratio: float) -> dict[str, int]:
    """run.py 180-197: the four DataLoaders' batch sizes."""
    return {"neg_clean": int(batch_size * (1 - posi_batch_ratio)), "pos_full": int(batch_size * posi_batch_ratio),
            "neg": int(batch_size * (1 - posi_query_ratio)), "pos": int(batch_size * posi_query_ratio)}


def official_ratios(epochs: int, warmup: int, ro: float, rT: float) -> list[float]:
    """trainer.py 586-715: the SPL ratio each epoch trains with (set at the end of the epoch before)."""
    ratio, used = ro, []
    for epoch in range(epochs):
        used.append(ratio)
        if epoch >= warmup:
            ratio = (epoch - warmup) * (rT - ro) / (epochs - warmup) + ro
    return used


def official_top_positives(p: dict, ratio: float) -> set:
    """InssepSPLDataset.init_bag, posbag: tiles of tumour slides with p >= quantile(p > threshold, 1 - ratio)."""
    confidence = [v for v in p.values() if v > THRESHOLD]
    cut = np.quantile(confidence, 1 - ratio)
    return {k for k, v in p.items() if v >= cut}


def official_uncertain(p: dict, ratio: float) -> set:
    """InssepSPLDataset.init_bag, negative loader without the uncertain mask: tumour-slide tiles with p <= threshold
    and p <= quantile(those p, ratio)."""
    below = [v for v in p.values() if v <= THRESHOLD]
    cut = np.quantile(below, ratio)
    return {k for k, v in p.items() if v <= THRESHOLD and v <= cut}


def official_labels(keys: list[tuple[str, int]], p: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """__getitem__ of the official datasets: bag label from the slide name, label 1 iff tumour slide and p > 0.3."""
    bag = torch.tensor([int(s.startswith("tumor")) for s, _ in keys])
    label = torch.tensor([int(s.startswith("tumor") and p[(s, t)] > THRESHOLD) for s, t in keys])
    return label, bag


def tumour_slides(p: dict) -> list[str]:
    """The slides of the tiles in `p`."""
    return sorted({s for s, _ in p})


# ---------------------------------------------------------------- a small cohort's round, through round_rows

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """A store of 30 tumour and 12 normal slides, one round's selection and the official loop's config."""
    root = tmp_path_factory.mktemp("official_pipeline")
    store = FeatureStore(root, "fixture", round=1)
    rng = np.random.default_rng(7)
    records, p, on_positive, negative = [], {}, [], []
    for name, n in [(f"tumor_{i:03d}", TILES_POS) for i in range(N_POS_SLIDES)] + \
                   [(f"normal_{i:03d}", TILES_NEG) for i in range(N_NEG_SLIDES)]:
        tiles = pa.table({"tile_id": np.arange(n, dtype=np.int32), "x": np.arange(n, dtype=np.int32) * 224,
                          "y": np.zeros(n, np.int32), "level": np.zeros(n, np.int8), "size": np.full(n, 224, np.int16)})
        store.write_slide(name, tiles, np.zeros((n, 2), np.float32))
        records.append(SlideRecord(name, f"/slides/{name}.tif", int(name.startswith("tumor")), "train"))
        scores = rng.uniform(0, 1, n).astype(np.float32)
        p.update({(name, t): float(v) for t, v in enumerate(scores)})
        part = pa.table({"slide_id": [name] * n, "tile_id": np.arange(n, dtype=np.int32), "score": scores})
        (on_positive if name.startswith("tumor") else negative).append(part)
    on_positive, negative = pa.concat_tables(on_positive), pa.concat_tables(negative)
    hard = negative.take(np.argsort(-negative["score"].to_numpy())[:300])  # the miner's top 300 of 720
    selection = Selection(hard, with_rank(select_positives(on_positive, THRESHOLD, ratio=1.0)),
                          uncertain_negatives(on_positive, THRESHOLD, ratio=1.0), {})
    config = small_config({"run": {"rounds": 4}, "finetune": {"loop": "official", "batch_size": BATCH,
                                                               "epochs_per_round": 5, "warmup_epochs": 1}})
    rows = round_rows(config, store, records, selection, 1, uncertain_joined=True)
    loop = {"ft": dataclasses.asdict(config.finetune), "total_epochs": config.total_finetune_epochs, "seed": 0,
            "ro": config.mining.ro, "rT": config.mining.rT, "supervised": True, "tile_size": TILE}
    hard_keys = set(zip(hard["slide_id"].to_pylist(), hard["tile_id"].to_pylist()))
    return {"rows": tile_batches.worker_share(rows, 0, 1), "table": rows, "loop": loop, "p": p, "hard": hard_keys,
            "config": config, "store": store, "records": records, "selection": selection}


def _fake_decode(readers, batch, tile_size, workers):
    """Tiles whose pixels encode the row's tile id (no slide files needed); no decode errors."""
    tiles = np.broadcast_to(batch["tile_id"].astype(np.uint8)[:, None, None, None], (len(batch["tile_id"]), tile_size,
                                                                                      tile_size, 3)).copy()
    return tiles, np.full(len(tiles), "", dtype=object)


class _Recorder(nn.Module):
    """A tiny projection model that keeps what it returned, so the test can recompute the loss on the same views."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * TILE * TILE, 8))
        self.outputs: list[torch.Tensor] = []

    def forward(self, x):
        out = self.net(x)
        self.outputs.append(out)
        return out


def _run_epoch(cohort, epoch: int, monkeypatch, rank: int = 0, world: int = 1, decode=_fake_decode,
               losses_for: int = 0) -> list[dict]:
    """One epoch of our pipeline: epoch_batches -> decoded_batches (-> official_step_loss for the first `losses_for`
    steps); per step the rows in the decoded batch's order (what the loss receives), which step it was, the loss, the
    views and the labels the loss received."""
    monkeypatch.setattr(tile_batches, "decode_batch", decode)
    seen = []
    for name in ("supcon_step_a", "supcon_step_b"):
        real = getattr(losses, name)

        def spy(z1, z2, labels, *args, _real=real, _name=name, **kw):
            seen.append((_name, labels.clone()))
            return _real(z1, z2, labels, *args, **kw)

        monkeypatch.setattr(losses, name, spy)
    model, gen = _Recorder(), torch.Generator().manual_seed(0)
    fc, share = cohort["loop"]["ft"], cohort["rows"]
    batches, step_b, ratio = epoch_batches(cohort["loop"], share, epoch, rank, world)
    steps = []
    for i, (batch, is_b) in enumerate(zip(tile_batches.decoded_batches(share, batches, TILE, None), step_b)):
        model.outputs.clear()
        seen.clear()
        loss = official_step_loss(batch, is_b, model, fc, gen, "cpu", "bgr01", world) if i < losses_for else None
        keys = list(zip(batch["slide_id"].tolist(), batch["tile_id"].tolist()))
        steps.append({"b": is_b, "keys": keys, "kind": batch["kind"], "loss": loss, "ratio": ratio,
                      "views": [z.detach() for z in model.outputs], "label": batch["label"],
                      "loss_labels": seen[0][1] if seen else None})
    return steps


# ---------------------------------------------------------------- per-step A/B sizes and what each stream holds

def test_official_step_sizes_are_the_official_loaders():
    from hnm_ray.training.official_steps import step_sizes

    for batch, a, b in [(512, 0.2, 0.05), (64, 0.2, 0.05), (300, 0.3, 0.1)]:
        sizes = step_sizes(batch, a, b)
        assert official_loader_sizes(batch, a, b) == {"neg_clean": sizes.a_neg, "pos_full": sizes.a_pos,
                                                      "neg": sizes.b_neg, "pos": sizes.b_pos}
    assert dataclasses.astuple(step_sizes(512, 0.2, 0.05)) == (409, 102, 486, 25)


@pytest.mark.parametrize("epoch", [0, 1, 7])
def test_each_step_holds_the_official_streams(cohort, epoch, monkeypatch):
    sizes = official_loader_sizes(BATCH, 0.2, 0.05)
    p, hard = cohort["p"], cohort["hard"]
    tumour = {k: v for k, v in p.items() if k[0].startswith("tumor")}
    above = {k for k, v in tumour.items() if v > THRESHOLD}
    ratio = official_ratios(cohort["loop"]["total_epochs"], 1, 0.2, 0.8)[epoch]
    top, uncertain = official_top_positives(tumour, ratio), official_uncertain(tumour, ratio)
    steps = _run_epoch(cohort, epoch, monkeypatch)
    a_steps, b_steps = [s for s in steps if not s["b"]], [s for s in steps if s["b"]]
    assert len(a_steps) == len(hard) // sizes["neg_clean"]  # an epoch = n_hard // 409 steps (drop_last)
    assert len(b_steps) == (len(a_steps) if epoch >= 1 else 0)  # step B after the warm-up, after each step A
    assert [s["b"] for s in steps] == ([False, True] * len(a_steps) if epoch >= 1 else [False] * len(a_steps))
    a_negatives = []
    for step in a_steps:
        negatives = [k for k in step["keys"] if k[0].startswith("normal")]
        positives = [k for k in step["keys"] if k[0].startswith("tumor")]
        assert (len(negatives), len(positives)) == (sizes["neg_clean"], sizes["pos_full"])
        assert set(negatives) <= hard and set(positives) <= above  # every positive above 0.3 may enter step A
        a_negatives += negatives
    assert len(set(a_negatives)) == len(a_negatives)  # the epoch iterates over the hard negatives once
    for step in b_steps:
        positives = [k for k, kind in zip(step["keys"], step["kind"]) if kind == POSITIVE]
        negatives = [k for k, kind in zip(step["keys"], step["kind"]) if kind != POSITIVE]
        assert (len(negatives), len(positives)) == (sizes["neg"], sizes["pos"])
        assert set(positives) <= top and set(negatives) <= hard | uncertain
    assert all(s["ratio"] == pytest.approx(ratio, abs=1e-12) for s in steps)


def test_step_a_positives_cycle_through_every_positive_above_the_threshold(cohort, monkeypatch):
    """Officially step A's positives come from a loader of all positives above 0.3, re-iterated (reshuffled) when
    exhausted: no repeat inside a pass, and over epochs every such positive, not a fixed sample of the top r_t."""
    above = {k for k, v in cohort["p"].items() if k[0].startswith("tumor") and v > THRESHOLD}
    rows, drawn, loop = cohort["rows"], set(), {**cohort["loop"], "total_epochs": 100}
    for epoch in range(60):
        batches, step_b, _ = epoch_batches(loop, rows, epoch, 0, 1)
        this_epoch = [(rows["slide_id"][i], int(rows["tile_id"][i])) for batch, b in zip(batches, step_b) if not b
                      for i in batch if rows["kind"][i] == POSITIVE]
        assert len(set(this_epoch)) == len(this_epoch) < len(above)  # one pass of the loader: no repeat
        drawn |= set(this_epoch)
    assert drawn == above


def test_every_positive_slide_is_a_step_b_anchor(cohort, monkeypatch):
    """The anchors of step B (label 1 rows as the loss receives them, after the decode's per-slide grouping) come from
    every tumour slide, as the official random 25 top-r positives per step do (no alphabetical bias)."""
    tumour = {k: v for k, v in cohort["p"].items() if k[0].startswith("tumor")}
    ratios = official_ratios(cohort["loop"]["total_epochs"], 1, 0.2, 0.8)
    anchors: dict[str, int] = {}
    for epoch in range(1, cohort["loop"]["total_epochs"]):
        for step in _run_epoch(cohort, epoch, monkeypatch):
            if step["b"]:
                for (slide, _), label in zip(step["keys"], step["label"].tolist()):
                    if label == 1:
                        anchors[slide] = anchors.get(slide, 0) + 1
    expected = {s for e in range(1, len(ratios)) for s, _ in official_top_positives(tumour, ratios[e])}
    assert set(anchors) == expected == set(tumour_slides(tumour))
    counts = np.array(list(anchors.values()))
    assert counts.max() <= 4 * counts.mean()  # no slide dominates (today's code: the first slides ~every step)


def test_the_loss_of_each_step_is_the_official_supcon_of_the_official_labels(cohort, monkeypatch):
    """The loss our step computes equals the official SupConLoss (pair_mode 2 for A with the uncertain mask, 1 for B)
    of the same views with labels and bag labels the official datasets give these tiles."""
    steps = _run_epoch(cohort, 3, monkeypatch, losses_for=4)[:4]
    assert [s["b"] for s in steps] == [False, True, False, True]
    for step in steps:
        assert torch.equal(step["loss_labels"], torch.from_numpy(step["label"].astype(np.int64)))
        labels, bag = official_labels(step["keys"], cohort["p"])
        z1, z2 = (z.double() for z in step["views"])
        reference = _reference_supcon(z1, z2, labels, bag, 1 if step["b"] else 2, not step["b"])
        assert step["loss"].item() == pytest.approx(reference.item(), rel=1e-5)


def test_uncertain_negatives_join_only_after_an_adopted_update(cohort):
    config, store, records, selection = (cohort[k] for k in ("config", "store", "records", "selection"))
    before = round_rows(config, store, records, selection, 1, uncertain_joined=False)
    after = round_rows(config, store, records, selection, 1, uncertain_joined=True)
    below = sum(1 for k, v in cohort["p"].items() if k[0].startswith("tumor") and v <= THRESHOLD)
    assert int(np.sum(before["kind"].to_numpy() == UNCERTAIN_NEGATIVE)) == 0
    assert int(np.sum(after["kind"].to_numpy() == UNCERTAIN_NEGATIVE)) == below  # each epoch keeps its lowest r_t


def test_official_ratio_lags_one_epoch_as_the_official_scheduler():
    used = official_ratios(100, 5, 0.2, 0.8)
    ours = [official_ratio(e, 5, 100, 0.2, 0.8) for e in range(100)]
    np.testing.assert_allclose(ours, used, rtol=0, atol=1e-12)
    assert ours[99] == pytest.approx(0.2 + 93 * 0.6 / 95)  # 0.787, not 0.8


# ---------------------------------------------------------------- N workers: the official per-step batch, split

def test_workers_split_each_official_step(cohort, monkeypatch):
    world = 3
    per_rank = [epoch_batches(cohort["loop"], cohort["rows"], 4, rank, world) for rank in range(world)]
    whole, whole_b, _ = epoch_batches(cohort["loop"], cohort["rows"], 4, 0, 1)
    assert {len(b) for b, _, _ in per_rank} == {len(whole)}  # every rank takes as many steps: DDP stays in lockstep
    for i, step in enumerate(whole):
        parts = [per_rank[r][0][i] for r in range(world)]
        assert sorted(np.concatenate(parts).tolist()) == sorted(step.tolist())
        assert max(map(len, parts)) - min(map(len, parts)) <= 2
        assert all(per_rank[r][1][i] == whole_b[i] for r in range(world))


def test_ranks_take_the_same_step_decision_when_one_cannot_decode(cohort, monkeypatch):
    """A rank whose tiles all fail to decode still takes the step (a zero loss with zero gradients, a forward and a
    backward: the same DDP all-reduces as the other ranks); in one process the step is skipped."""
    def failing(readers, batch, tile_size, workers):
        tiles, errors = _fake_decode(readers, batch, tile_size, workers)
        return tiles, np.full(len(tiles), "corrupt JPEG", dtype=object)

    healthy = _run_epoch(cohort, 2, monkeypatch, rank=0, world=2, losses_for=4)[:4]
    broken = _run_epoch(cohort, 2, monkeypatch, rank=1, world=2, decode=failing, losses_for=4)[:4]
    assert len(healthy) == len(broken) and all(s["loss"] is not None for s in healthy + broken)
    model = _Recorder()
    batch = next(tile_batches.decoded_batches(cohort["rows"], [np.arange(6)], TILE, None))
    batch["error"] = np.full(6, "corrupt JPEG", dtype=object)
    loss = official_step_loss(batch, False, model, cohort["loop"]["ft"], torch.Generator(), "cpu", "bgr01", 2)
    loss.backward()
    assert loss.item() == 0 and all(float(p.grad.abs().max()) == 0 for p in model.parameters())
    assert official_step_loss(batch, False, model, cohort["loop"]["ft"], torch.Generator(), "cpu", "bgr01", 1) is None


# ---------------------------------------------------------------- MIL: the ranking term's weight, the gate's F1

def test_class_ratio_scales_the_bce_terms_only(monkeypatch):
    """utils.py epoch_train with BCEWithLogitsLoss(ratio): w_bag (bag BCEs) / 2 + w_ins (max BCEs) / 2, each BCE
    times the ratio, + w_rank * ranking loss unscaled."""
    from hnm_ray.models.aggregators import build_aggregator
    from hnm_ray.training.mil import _pair_step, bce_weighting

    gen = torch.Generator().manual_seed(0)
    model = build_aggregator("dsmil_its2clr", 16)
    bags = [Bag(f"s{y}", torch.randn(n, 16, generator=gen).numpy(), np.arange(n), np.zeros((n, 2)), np.zeros(n), y)
            for y, n in ((1, 30), (0, 25))]
    n_pos, n_neg = 11, 16
    pos_weight, scale = bce_weighting("uniform", n_pos, n_neg)
    kw = {"w_bag": 0.5, "w_ins": 0.5, "w_rank": 0.1, "margin": 1.0, "rank_k": 10, "ranking": "pair",
          "pos_weight": pos_weight, "scale": scale}
    ours = _pair_step(model, bags[0], bags[1], None, kw, "cpu", scale=1.0)
    with torch.no_grad():
        (pi, pb), (ni, nb) = (model(torch.from_numpy(b.features)) for b in bags)
        criterion = nn.BCEWithLogitsLoss(torch.tensor(n_neg / n_pos))  # positionally: weight, as officially
        one, zero = torch.ones(1, 1), torch.zeros(1, 1)
        bce = 0.5 * (criterion(pb.view(1, -1), one) + criterion(nb.view(1, -1), zero)) / 2 + \
            0.5 * (criterion(pi.max().view(1, -1), one) + criterion(ni.max().view(1, -1), zero)) / 2
        top_neg, top_pos = (torch.topk(s.view(-1), 10).values.sum() / 10 for s in (ni, pi))
        rank = torch.relu(1 + top_neg - top_pos)
        official = bce + 0.1 * rank
    assert rank.item() > 0 and n_neg / n_pos != 1  # the case where scaling the ranking term shows
    assert ours == pytest.approx(official.item(), rel=1e-5)


@pytest.mark.timeout(400)  # the session's mil_store may be extracted in its setup
def test_update_gate_gets_the_best_validation_f1_over_all_mil_epochs(mil_store, mil_cohort, tmp_path):
    """trainer.py 309-336: optimal_ac_val starts at 0 and takes every better epoch's validation F1; the gate compares
    it, whatever epoch the pseudo labels come from (fixed epoch 199 in the paper's recipe)."""
    from hnm_ray.store.manifest import load_manifest
    from hnm_ray.training.rounds import gate_f1, train_aggregator

    records = load_manifest(mil_cohort)
    # min_val_bags 1: F1 at each epoch's own validation threshold (the 16-slide cohort would take the fallback at 0.5)
    config = small_config({"mil": {"epochs": 4, "select_epoch": "fixed", "fixed_epoch": 0, "lr": 3e-3,
                                   "min_val_bags": 1}})
    result = train_aggregator(config, mil_store, records, tmp_path, 0, None, miner_name="")
    history = _mil_history(tmp_path)
    optimal = 0.0
    for row in history:
        if row["val_f1"] > optimal:
            optimal = row["val_f1"]
    assert len(history) == 4 and result["best_epoch"] == 0
    assert gate_f1(result) == pytest.approx(optimal)
    # the fixed epoch's F1 is not what the gate sees (seeded: 0.67 at epoch 0, 1.0 at the best epoch)
    assert optimal > history[0]["val_f1"], [row["val_f1"] for row in history]


def _mil_history(run_dir: Path) -> list[dict]:
    """Every MIL epoch's metrics, from the loop's last checkpoint."""
    from hnm_ray.training.checkpointing import driver_checkpoint_dir, load_state, newest_driver_checkpoint
    from hnm_ray.training.mil import CHECKPOINT_FILE

    folder = driver_checkpoint_dir(0, run_dir / "ray_train", "mil_round0")
    return load_state(newest_driver_checkpoint(folder, CHECKPOINT_FILE), CHECKPOINT_FILE)["history"]


# ---------------------------------------------------------------- the SimCLR checkpoint's projection head

def test_the_projection_head_comes_from_the_simclr_checkpoint(tmp_path):
    """trainer.py 790-821 loads the whole SimCLR ResNet, fc (the projection head) included, strictly: round 0's
    fine-tuning model holds the checkpoint's head, not a random one."""
    from hnm_ray.train import initial_head

    checkpoint, encoder, head = _official_checkpoint("simclr", seed=3)
    path = tmp_path / "simclr.pth"
    torch.save(checkpoint, path)
    head_path = initial_head(str(path), tmp_path)
    model = build_contrastive(EncoderConfig(name="resnet18_in", norm="plain", input_space="bgr01"), str(path),
                              head_path, 256)
    for key, value in head.items():
        assert torch.equal(model.head.state_dict()[key], value), key
    assert torch.equal(model.encoder.state_dict()["conv1.weight"], encoder["conv1.weight"])
    assert initial_head(None, tmp_path) is None



@pytest.mark.timeout(120)
def test_ddp_ranks_stay_in_lockstep_when_one_cannot_decode_a_step(tmp_path):
    """Two real DDP ranks (gloo): rank 1's tiles of one step all fail to decode; both ranks take every step (the same
    all-reduces: no hang, a 30 s gloo timeout otherwise) and end with the same weights."""
    import torch.multiprocessing as mp

    from _ddp_step import run_rank

    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    mp.spawn(run_rank, args=(2, str(tmp_path / "init"), outs), nprocs=2, join=True)
    first, second = (torch.load(p, weights_only=True) for p in outs)
    assert all(torch.equal(first[k], second[k]) for k in first)
