"""MIL aggregator training on Ray Train: epoch pairing, learning on demo features, DDP, resume, ranking forms."""
from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from _support import LiveBags, wait_for

from hnm_ray.training.losses import pair_loss
from hnm_ray.models.aggregators import build_standardized
from hnm_ray.store.bag_cache import GIB, BagCache, bag_bytes
from hnm_ray.store.features import FeatureStore
from hnm_ray.store.manifest import SlideRecord, load_manifest
from hnm_ray.config import MILConfig, from_tree
from hnm_ray.models.inference import evaluate_split, load_aggregator
from hnm_ray.training.mil import epoch_pairs, feature_statistics, fit_mil, standardisation
from hnm_ray.training.schedules import lr_at

# 40 epochs of the demo's 4 pairs are 160 Adam steps: at the official lr 2e-4 the model is under-trained (test
# instance AUC 0.66 on average over 6 seeds), at 1e-3 it is unstable (0.25-0.95 over 10 seeds); 3e-3 for 60
# epochs gives 0.85-0.96 on every one of 10 seeds.
DEMO_KNOBS = {"lr": 3e-3, "epochs": 60}
# Real Ray Train runs pay a report (+ barrier) per epoch: keep them short.
DDP_KNOBS = {"lr": 3e-3, "epochs": 10, "checkpoint_every": 5, "cpus_per_worker": 0.5}


@pytest.fixture(scope="module")
def records(mil_cohort):
    return load_manifest(mil_cohort)


def train_ids(records, label: int) -> list[str]:
    return [r.slide_id for r in records if r.split == "train" and r.label == label]


def parameters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Trainable weights of a saved Standardized aggregator (the feature mean/std buffers left out)."""
    return {k: v for k, v in state.items() if k.startswith("aggregator.")}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=atol, rtol=0) for k in a)


def last_checkpoint(run_dir: Path, name: str) -> dict:
    """The newest checkpoint state (highest epoch) a distributed run left in its Ray Train storage folder."""
    states = [torch.load(f, map_location="cpu", weights_only=True)
              for f in (Path(run_dir) / "ray_train" / name).glob("checkpoint_*/mil.pt")]
    assert states, f"no Ray Train checkpoint under {run_dir}/ray_train/{name}"
    return max(states, key=lambda s: s["epoch"])


def replay(store, records, config: MILConfig, seed: int, world: int) -> dict[str, torch.Tensor]:
    """fit_mil's loop replayed in one process for `world` ranks: every step minimises the mean of the ranks'
    pair losses, which is what DDP's gradient averaging computes; the learning rate of each epoch set from
    config.lr_schedule's formula. Returns the final weights."""
    train = [r for r in records if r.split == "train"]
    pos, neg = train_ids(records, 1), train_ids(records, 0)
    mean, std, _ = standardisation(store, [r.slide_id for r in train], config.standardize)
    bags = {r.slide_id: torch.from_numpy(store.read_bag(r.slide_id).features) for r in train}
    torch.manual_seed(seed)
    model = build_standardized(config.aggregator, int(store.metadata()["dim"]), hidden=config.hidden,
                               dropout=config.dropout)
    model.set_statistics(mean, std)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    pos_weight = torch.tensor(len(neg) / len(pos))
    for epoch in range(config.epochs):
        model.train()
        optimizer.param_groups[0]["lr"] = lr_at(config.lr_schedule, epoch, config.lr, config.epochs)
        steps = list(zip(*(epoch_pairs(pos, neg, epoch, seed, rank, world) for rank in range(world))))
        k = config.pairs_per_step
        for first in range(0, len(steps), k):  # gradients of k pairs accumulated per optimiser step
            optimizer.zero_grad()
            for step in steps[first:first + k]:
                loss = sum(pair_loss(model(bags[p]), model(bags[n]), pos_weight, config.w_bag, config.w_ins,
                                     config.w_rank, config.margin, config.rank_k) for p, n in step) / world
                (loss / k).backward()
            optimizer.step()
    return parameters(model.state_dict())


# -- epoch pairing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n_pos,n_neg", [(7, 5), (5, 7), (8, 8), (3, 10), (1, 4)])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_pairs_balanced_and_sharded(n_pos, n_neg, world):
    pos, neg = [f"p{i}" for i in range(n_pos)], [f"n{i}" for i in range(n_neg)]
    steps = math.ceil(max(n_pos, n_neg) / world)
    for rank in range(world):
        pairs = epoch_pairs(pos, neg, epoch=3, seed=11, rank=rank, world=world)
        assert len(pairs) == steps, "every worker must take the same number of DDP steps"
        own_pos, own_neg = pos[rank::world] or pos, neg[rank::world] or neg
        assert all(p in own_pos and n in own_neg for p, n in pairs), "a worker pairs only bags of its own shards"
        for own, side in ((own_pos, 0), (own_neg, 1)):
            counts = [sum(pair[side] == b for pair in pairs) for b in own]
            assert min(counts) >= 1, "an epoch uses every bag of the worker's shards (none of the larger class dropped)"
            assert max(counts) - min(counts) <= 1, "a short shard is cycled evenly"
    if world == 1:
        pairs = epoch_pairs(pos, neg, 0, 11, 0, 1)
        larger, side = (neg, 1) if n_pos <= n_neg else (pos, 0)
        assert sorted(p[side] for p in pairs) == sorted(larger), "one epoch visits every bag of the larger class once"


def test_epoch_pairs_shards_are_disjoint_and_cover_the_bags():
    pos, neg = [f"p{i}" for i in range(8)], [f"n{i}" for i in range(8)]
    per_rank = [epoch_pairs(pos, neg, 0, 0, rank, 2) for rank in range(2)]
    used = [{p for p, _ in pairs} | {n for _, n in pairs} for pairs in per_rank]
    assert not used[0] & used[1]
    assert used[0] | used[1] == set(pos) | set(neg)


def test_epoch_pairs_reshuffle_each_epoch_and_are_seeded():
    pos, neg = [f"p{i}" for i in range(20)], [f"n{i}" for i in range(20)]
    epochs = [epoch_pairs(pos, neg, epoch, 5, 0, 1) for epoch in range(4)]
    assert len({tuple(e) for e in epochs}) == 4, "each epoch must pair and order the bags differently"
    assert epoch_pairs(pos, neg, 2, 5, 1, 2) == epoch_pairs(pos, neg, 2, 5, 1, 2)
    assert epoch_pairs(pos, neg, 2, 5, 0, 1) != epoch_pairs(pos, neg, 2, 6, 0, 1)
    assert epoch_pairs(pos, [], 0, 0, 0, 1) == []


# -- learning on the demo cohort's features ------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(400)
def test_mil_learns_demo_features(mil_store, records, tmp_path):
    """Round-0 small_cnn features (random encoder): the aggregator fits the training bags, finds the tumour tiles
    of unseen positive slides (instance AUC), and ranks test slides above chance.

    Slide AUC >= 0.9 on the 4 test slides is not a robust target here: both test positives and one test negative
    carry tumour mimics (same purple as tumour) that random features hardly tell apart; over 10 model seeds with
    these knobs the test slide AUC is 1.0 for 4 seeds, 0.75 for 2 and 0.5 for 4, while instance AUC is 0.85-0.96.
    """
    result = fit_mil(MILConfig(ensemble=1, workers=0, **DEMO_KNOBS), mil_store, records, tmp_path, seed=0)
    test = evaluate_split(result.model_path, mil_store, records, "test")
    train = evaluate_split(result.model_path, mil_store, records, "train")

    assert [h["epoch"] for h in result.history] == list(range(DEMO_KNOBS["epochs"]))
    losses = [h["train_loss"] for h in result.history]
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), "training loss must fall"
    for key in ("val_auc", "val_accuracy", "val_f1", "val_threshold", "val_loss"):
        assert np.isfinite(result.metrics[key]), key
    assert result.metrics["val_n"] == 4 and result.metrics["epoch"] == result.best_epoch
    assert result.metrics["val_auc"] >= 0.75
    assert train["train_auc"] == 1.0 and train["train_instance_auc"] >= 0.8
    assert test["test_n"] == 4 and test["test_instance_n"] > 100
    assert test["test_instance_auc"] >= 0.8, test
    assert test["test_auc"] >= 0.5, test
    assert 0.0 < result.threshold < 1.0 and test["test_threshold"] == pytest.approx(result.threshold)


# -- Ray Train: 1 vs 2 workers, resume -------------------------------------------------------------------

@pytest.fixture(scope="module")
def ddp_runs(ray_session, mil_store, records, tmp_path_factory):
    """A real 1-worker and 2-worker TorchTrainer run (same seed); their results captured at once."""
    runs = {}
    for world in (1, 2):
        run_dir = tmp_path_factory.mktemp(f"mil_ddp{world}")
        config = MILConfig(ensemble=1, workers=world, **DDP_KNOBS)
        result = fit_mil(config, mil_store, records, run_dir, name=f"ddp{world}", seed=0)
        runs[world] = {"config": config, "run_dir": run_dir, "result": result,
                       "final": parameters(last_checkpoint(run_dir, f"ddp{world}")["model"]),
                       "best": parameters(load_aggregator(result.model_path)[0].state_dict()),
                       **evaluate_split(result.model_path, mil_store, records, "test"),
                       **evaluate_split(result.model_path, mil_store, records, "val")}
    return runs


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_one_and_two_workers_train_alike(ddp_runs, mil_store, records):
    one, two = ddp_runs[1], ddp_runs[2]
    assert [h["train_pairs"] for h in two["result"].history] == [4] * DDP_KNOBS["epochs"]
    # DDP really averages: the 2-worker weights equal a one-process replay minimising the mean of both ranks'
    # pair losses per step (and differ from the 1-worker run, which takes twice as many steps).
    for world, run in ddp_runs.items():
        assert same_weights(run["final"], replay(mil_store, records, run["config"], 0, world), atol=1e-4), world
    assert not same_weights(one["final"], two["final"], atol=1e-3)
    torch.manual_seed(0)
    init = build_standardized("dsmil", int(mil_store.metadata()["dim"]), hidden=128, dropout=0.0)
    assert not same_weights(two["best"], parameters(init.state_dict()), atol=1e-3), "the 2-worker model trained"
    for run in (one, two):
        assert run["test_instance_auc"] >= 0.8 and run["val_instance_auc"] >= 0.8, run
        assert run["val_auc"] >= 0.75, run
    assert abs(one["test_instance_auc"] - two["test_instance_auc"]) <= 0.1
    assert abs(one["val_instance_auc"] - two["val_instance_auc"]) <= 0.1
    assert abs(one["test_auc"] - two["test_auc"]) <= 0.25  # 4 test slides: one mis-ordered pair is 0.25


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_rerun_with_more_epochs_resumes_from_storage(ddp_runs, mil_store, records):
    first = ddp_runs[2]
    done = DDP_KNOBS["epochs"]
    started = time.time()
    config = replace(first["config"], epochs=done + 3)
    result = fit_mil(config, mil_store, records, first["run_dir"], name="ddp2", seed=0)
    history = result.history
    assert [h["epoch"] for h in history] == list(range(done + 3)), "every epoch once: old ones kept, not re-run"
    assert all(h["reported_at"] < started for h in history[:done])
    assert all(h["reported_at"] >= started for h in history[done:])
    assert [h["train_loss"] for h in history[:done]] == [h["train_loss"] for h in first["result"].history]
    assert last_checkpoint(first["run_dir"], "ddp2")["epoch"] == done + 2


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_driver_mode_run_resumes_and_keeps_two_checkpoints(mil_store, records, tmp_path):
    config = MILConfig(ensemble=1, workers=0, epochs=4, checkpoint_every=1)
    first = fit_mil(config, mil_store, records, tmp_path, name="local", seed=3)
    started = time.time()
    again = fit_mil(replace(config, epochs=7), mil_store, records, tmp_path, name="local", seed=3)
    assert [h["epoch"] for h in again.history] == list(range(7))
    assert [h["reported_at"] < started for h in again.history] == [True] * 4 + [False] * 3
    assert again.history[:4] == first.history
    kept = sorted(p.name for p in (tmp_path / "ray_train" / "local" / "driver_checkpoints").iterdir())
    assert kept == ["epoch_000005", "epoch_000006"]
    same = fit_mil(replace(config, epochs=7), mil_store, records, tmp_path, name="local", seed=3)
    assert same.history == again.history and same.best_epoch == again.best_epoch  # nothing left to train


# -- ranking forms -----------------------------------------------------------------------------------

@pytest.mark.ray
@pytest.mark.timeout(400)
def test_ranking_forms(ray_session, mil_store, records, tmp_path):
    import ray

    from hnm_ray.mining.miner import get_miner
    from hnm_ray.mining.scoring import count_tiles

    def weights(name: str, miner_name: str | None = None, **knobs) -> dict[str, torch.Tensor]:
        config = MILConfig(ensemble=1, workers=0, epochs=6, lr=3e-3, **knobs)
        result = fit_mil(config, mil_store, records, tmp_path, name=name, miner_name=miner_name, seed=1)
        assert all(np.isfinite(h["train_loss"]) for h in result.history)
        return parameters(load_aggregator(result.model_path)[0].state_dict())

    none = weights("none", ranking="none")
    pair = weights("pair", ranking="pair", w_rank=0.5, rank_k=3)
    assert same_weights(weights("pair_w0", ranking="pair", w_rank=0.0), none), "w_rank=0 is no ranking term"
    assert not same_weights(pair, none, atol=1e-4)

    negatives = train_ids(records, 0)
    empty = get_miner("test_mil_no_round")  # no begin_round: the global form has no queue and adds no term
    assert same_weights(weights("global_empty", miner_name="test_mil_no_round", ranking="global", w_rank=0.5), none)
    miner = get_miner("test_mil_global")
    ray.get(miner.begin_round.remote(count_tiles(mil_store, negatives), 0.2))
    for slide_id in negatives:  # queue: the tiles whose first feature is largest (any fixed score will do)
        bag = mil_store.read_bag(slide_id)
        ray.get(miner.push.remote(slide_id, bag.tile_ids, bag.features[:, 0]))
    assert ray.get(miner.stats.remote())["size"] == math.ceil(0.2 * count_tiles(mil_store, negatives))
    global_ = weights("global", miner_name="test_mil_global", ranking="global", w_rank=0.5, rank_k=3, global_pool=64)
    assert not same_weights(global_, none, atol=1e-4) and not same_weights(global_, pair, atol=1e-4)
    for actor in (empty, miner):
        ray.kill(actor)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_pairs_per_step_accumulates_gradients(ray_session, mil_store, records, tmp_path):
    """pairs_per_step=2: one optimiser step per two pairs, equal to a replay that accumulates them."""
    config = MILConfig(ensemble=1, workers=0, epochs=3, pairs_per_step=2, checkpoint_every=1)
    fit_mil(config, mil_store, records, tmp_path, name="acc", seed=0)
    state = torch.load(sorted((tmp_path / "ray_train" / "acc" / "driver_checkpoints").glob("epoch_*"))[-1] / "mil.pt",
                       map_location="cpu", weights_only=True)
    assert same_weights(parameters(state["model"]), replay(mil_store, records, config, 0, 1), atol=1e-4)
    plain = MILConfig(ensemble=1, workers=0, epochs=3, pairs_per_step=1)
    assert not same_weights(parameters(state["model"]), replay(mil_store, records, plain, 0, 1), atol=1e-4)


def test_cosine_lr_schedule_is_what_the_trainer_steps_with(mil_store, records, tmp_path):
    """mil.lr_schedule cosine, as a config file or --set gives it: the trainer's last-epoch weights are those of a
    replay whose rate follows the cosine epoch by epoch, not those of the constant rate."""
    cosine = from_tree(MILConfig, {"ensemble": 1, "workers": 0, "epochs": 4, "lr": 3e-3, "lr_schedule": "cosine"})
    fit_mil(cosine, mil_store, records, tmp_path, name="cosine", seed=4)
    last = sorted((tmp_path / "ray_train" / "cosine" / "driver_checkpoints").glob("epoch_*"))[-1] / "mil.pt"
    trained = parameters(torch.load(last, map_location="cpu", weights_only=True)["model"])
    assert same_weights(trained, replay(mil_store, records, cosine, 4, 1), atol=1e-4)
    constant = replay(mil_store, records, replace(cosine, lr_schedule="constant"), 4, 1)
    assert not same_weights(trained, constant, atol=1e-4)


def test_report_cadence_changes_nothing_but_the_number_of_reports(mil_store, records, tmp_path):
    """Validation and the kept epoch are decided in the worker every epoch: reporting every 7 epochs instead of
    every epoch gives the same best epoch, threshold, weights and per-epoch history."""
    runs = {}
    for every in (1, 7):
        config = MILConfig(ensemble=1, workers=0, epochs=9, lr=3e-3, checkpoint_every=every)
        runs[every] = fit_mil(config, mil_store, records, tmp_path / f"every{every}", name="cadence", seed=2)
    per_epoch, sparse = runs[1], runs[7]
    assert sparse.best_epoch == per_epoch.best_epoch and sparse.threshold == per_epoch.threshold
    assert same_weights(parameters(load_aggregator(sparse.model_path)[0].state_dict()),
                        parameters(load_aggregator(per_epoch.model_path)[0].state_dict()), atol=0)
    strip = [{k: v for k, v in h.items() if k not in ("reported_at", "epoch_seconds")} for h in sparse.history]
    assert strip == [{k: v for k, v in h.items() if k not in ("reported_at", "epoch_seconds")}
                     for h in per_epoch.history]
    assert sparse.official_protocol == per_epoch.official_protocol


def test_standardisation_modes(mil_store, records):
    ids = train_ids(records, 0) + train_ids(records, 1)
    mean, std = feature_statistics(mil_store, ids)
    z_mean, z_std, z_mode = standardisation(mil_store, ids, "per_feature")
    np.testing.assert_array_equal(z_std, std)
    s_mean, s_std, s_mode = standardisation(mil_store, ids, "shared")
    np.testing.assert_array_equal(s_mean, mean)
    np.testing.assert_allclose(s_std, np.full_like(std, np.sqrt(np.mean(std ** 2))))
    n_mean, n_std, n_mode = standardisation(mil_store, ids, "none")
    assert n_mean.tolist() == [0.0] and n_std.tolist() == [1.0]
    assert (z_mode, s_mode, n_mode) == ("per_feature", "shared", "none")
    # the demo's encoder features vary in one unit: auto shares one scale, as the default did before it
    a_mean, a_std, a_mode = standardisation(mil_store, ids, "auto")
    assert a_mode == "shared" and np.array_equal(a_std, s_std) and np.array_equal(a_mean, mean)


# -- model selection on a small validation split ------------------------------------------------------------

def array_store(root: Path, bags: dict[str, np.ndarray]) -> FeatureStore:
    """A feature store holding these (n_i, D) float32 bags as slides (tile ids 0..n_i-1)."""
    store = FeatureStore(root, "arrays")
    for slide_id, features in bags.items():
        n = len(features)
        zeros = np.zeros(n, np.int32)
        store.write_slide(slide_id, pa.table({"tile_id": np.arange(n, dtype=np.int32), "x": zeros, "y": zeros,
                                              "level": zeros, "size": zeros}), features)
    return store


@pytest.fixture(scope="module")
def small_val_cohort(tmp_path_factory):
    """16 training and 4 validation bags (half positive: one shifted instance), 8-d features, no Ray."""
    rng = np.random.default_rng(0)
    bags, records = {}, []
    for i in range(20):
        label, split = i % 2, "train" if i < 16 else "val"
        features = rng.normal(0, 1, (6, 8)).astype(np.float32)
        features[0, 0] += 3.0 * label
        bags[f"b{i:02d}"] = features
        records.append(SlideRecord(f"b{i:02d}", "", label, split))
    return array_store(tmp_path_factory.mktemp("small_val"), bags), records


def test_small_validation_split_keeps_the_fixed_epoch_and_threshold_half(small_val_cohort, tmp_path):
    """2 validation bags a class cannot pick an epoch or a threshold: the last epoch and 0.5 are kept, and the
    reported validation metrics are those at 0.5 (what the job's outputs and update gate read)."""
    store, records = small_val_cohort
    config = MILConfig(ensemble=1, epochs=6, checkpoint_every=100, workers=0)
    fallback = fit_mil(config, store, records, tmp_path / "fallback", seed=0)
    assert fallback.best_epoch == config.epochs - 1
    assert fallback.threshold == 0.5 and fallback.metrics["val_threshold"] == 0.5
    assert load_aggregator(fallback.model_path)[1]["threshold"] == 0.5
    chosen = fit_mil(replace(config, min_val_bags=2), store, records, tmp_path / "chosen", seed=0)
    assert chosen.threshold != 0.5, "with enough validation bags the Youden threshold on validation is kept"
    assert chosen.metrics["val_threshold"] == chosen.threshold


def test_instance_embedding_learns_a_concept_that_is_not_linear_in_the_features(tmp_path):
    """A positive bag holds one instance with feature 0 near 0, every other instance sits near -3 or +3 (a band,
    as MUSK's concept is a region of its features): no linear instance score nor a linear map of a pooled bag finds
    it (mil.embed 0: test AUC ~0.5), a learnt Linear + ReLU embedding (mil.embed 16) does, and is saved and reloaded
    with the model."""
    rng = np.random.default_rng(0)
    bags, records = {}, []
    for i in range(80):
        label, split = i % 2, "train" if i < 60 else "test"
        features = rng.normal(0, 0.3, (6, 4)).astype(np.float32)
        features[:, 0] = 3.0 * rng.choice([-1, 1], 6) + rng.normal(0, 0.3, 6)
        if label:
            features[0, 0] = rng.normal(0, 0.3)
        bags[f"b{i:02d}"] = features
        records.append(SlideRecord(f"b{i:02d}", "", label, split))
    store = array_store(tmp_path / "store", bags)
    auc = {}
    for embed in (0, 16):
        config = MILConfig(ensemble=1, epochs=15, embed=embed, checkpoint_every=100, workers=0)
        result = fit_mil(config, store, records, tmp_path / f"embed{embed}", seed=0)
        auc[embed] = evaluate_split(result.model_path, store, records, "test")["test_auc"]
    assert load_aggregator(result.model_path)[1]["embed"] == 16
    assert auc[16] >= 0.9 and auc[0] <= 0.75, auc


# -- bags read when needed, within mil.bag_cache_gib --------------------------------------------------------------

@pytest.fixture(scope="module")
def split_cohort(tmp_path_factory):
    """12 training, 6 validation and 6 test bags of 30 tiles (half positive: one shifted instance), 8-d, no Ray."""
    rng = np.random.default_rng(1)
    bags, records = {}, []
    for i in range(24):
        label, split = i % 2, "train" if i < 12 else "val" if i < 18 else "test"
        features = rng.normal(0, 1, (30, 8)).astype(np.float32)
        features[0, 0] += 3.0 * label
        bags[f"s{i:02d}"] = features
        records.append(SlideRecord(f"s{i:02d}", "", label, split))
    return array_store(tmp_path_factory.mktemp("split_cohort"), bags), records


def test_bags_are_read_when_needed_within_the_cache_budget(split_cohort, tmp_path, monkeypatch):
    """The MIL loop holds at most mil.bag_cache_gib of bags plus the two of the step in hand (training) or of the bag
    in hand and the next (validation, test), and the mil.read_ahead bags read meanwhile, never the whole store; with
    any budget and read-ahead the run is the same (pairs, weights, validation and official-protocol test metrics);
    a cohort within the budget is read once."""
    import hnm_ray.training.mil as mil

    store, records = split_cohort
    bag = 30 * (8 * 4 + 4 + 2 * 4 + 1)  # float32 features, int32 tile ids and coords, int8 truth
    config = MILConfig(ensemble=1, epochs=3, checkpoint_every=100, workers=0, min_val_bags=2)
    runs, counters = {}, {}
    for name, budget, ahead in (("all", 1.0, 2), ("four", 4 * bag / GIB, 0), ("none", 0.0, 2)):
        counters[name] = LiveBags()
        monkeypatch.setattr(mil, "FeatureStore", counters[name].store_class())
        runs[name] = fit_mil(replace(config, bag_cache_gib=budget, read_ahead=ahead), store, records, tmp_path / name,
                             seed=0)
    assert counters["all"].reads == len(records), "a cohort within the budget is read once"
    assert counters["four"].peak_bytes <= 6 * bag, counters["four"].peak_bytes / bag
    assert counters["none"].peak_bytes <= 4 * bag, counters["none"].peak_bytes / bag
    assert counters["none"].reads == config.epochs * len(records)  # every pair, validation and test bag, each epoch
    strip = [{k: v for k, v in h.items() if k not in ("reported_at", "epoch_seconds")} for h in runs["all"].history]
    weights = parameters(load_aggregator(runs["all"].model_path)[0].state_dict())
    for name in ("four", "none"):
        run = runs[name]
        assert [{k: v for k, v in h.items() if k not in ("reported_at", "epoch_seconds")} for h in run.history] == strip
        assert run.official_protocol == runs["all"].official_protocol and run.best_epoch == runs["all"].best_epoch
        assert same_weights(parameters(load_aggregator(run.model_path)[0].state_dict()), weights, atol=0)
    assert "val_auc" in strip[0] and runs["all"].official_protocol["test_auc"] >= 0


def test_bag_cache_reads_ahead_in_a_background_thread_within_its_bound(split_cohort):
    """iterate(ahead=2) reads the next two bags in another thread while the caller holds one (so a read overlaps the
    caller's step), never more than two ahead; bags come in order; alive at once: the one in hand + 2."""
    import threading

    store, records = split_cohort
    counter, readers = LiveBags(), []

    class ThreadNoting(counter.store_class()):
        def read_bag(self, slide_id, label=None, as_stored=False):
            readers.append(threading.current_thread().name)
            return super().read_bag(slide_id, label, as_stored)

    keys = [(r.slide_id, r.label) for r in records[:8]]
    size = bag_bytes(store.read_bag(keys[0][0]))
    got = []
    for bag in BagCache(ThreadNoting(store.root, store.encoder_tag), 0).iterate(keys, ahead=2):
        due = min(len(got) + 3, len(keys))  # the bag in hand and the next two, read without being asked
        wait_for(lambda: counter.reads >= due, 10, f"{due} reads")
        time.sleep(0.05)
        assert counter.reads == due and counter.live_bytes <= 3 * size, (counter.reads, counter.live_bytes / size)
        got.append(bag.slide_id)
    assert got == [k for k, _ in keys]
    assert readers and all(name.startswith("bag-read") for name in readers), readers


def test_bag_cache_keeps_float16_bags_as_stored_and_hands_out_float32(tmp_path):
    """A float16 store's bags are kept at float16 (twice the bags of float32 fit a budget) and handed out float32,
    equal to FeatureStore.read_bag's, from memory as after a read."""
    rng = np.random.default_rng(0)
    store = array_store(tmp_path, {f"s{i}": rng.normal(size=(30, 8)).astype(np.float16) for i in range(4)})
    half, full = bag_bytes(store.read_bag("s0", as_stored=True)), bag_bytes(store.read_bag("s0"))
    assert full <= 2 * half < 2 * full  # the budget holds two float16 bags, one float32 bag
    cache = BagCache(store, 2 * half)
    for rounds in range(2):
        for slide in ("s0", "s1", "s2"):
            bag = cache.get(slide, 1)
            assert bag.features.dtype == np.float32 and np.array_equal(bag.features, store.read_bag(slide).features)
    assert len(cache) == 2 and cache.reads == 4  # s0, s1 kept; s2 read twice


def test_bag_cache_hands_out_float32_bags_of_their_own_never_a_view_of_the_cached_buffer(tmp_path):
    """A float32 store's bag as stored can be a read-only view of Arrow's buffer: what the cache hands out (to torch,
    which may write into it) is writable and writing into it leaves the cached bag as read."""
    store = array_store(tmp_path, {"s0": np.arange(240, dtype=np.float32).reshape(30, 8)})
    cache = BagCache(store, 1 << 20)
    bag = cache.get("s0", 1)
    assert bag.features.dtype == np.float32 and bag.features.flags.writeable
    bag.features[:] = -1.0
    assert np.array_equal(cache.get("s0", 1).features, store.read_bag("s0").features)


def test_a_bag_past_max_bag_gib_stops_mil_before_any_bag_is_read(tmp_path, monkeypatch):
    """A bag larger than mil.max_bag_gib (float32 tiles x dim) is one StoreError naming the slide, its size and the
    knob, raised before a bag is read (not a worker killed for memory mid-epoch); a test bag counts (held whole)."""
    import hnm_ray.training.mil as mil

    from hnm_ray.core.errors import StoreError

    sizes = {"a": 30, "b": 30, "c": 30, "d": 30, "big": 60}
    store = array_store(tmp_path / "store", {s: np.ones((n, 8), np.float32) for s, n in sizes.items()})
    records = [SlideRecord(s, "", i % 2, "test" if s == "big" else "train") for i, s in enumerate(sizes)]
    counter = LiveBags()
    monkeypatch.setattr(mil, "FeatureStore", counter.store_class())
    config = MILConfig(ensemble=1, epochs=1, workers=0, max_bag_gib=45 * 8 * 4 / GIB)
    with pytest.raises(StoreError, match=r"slide 'big': its bag of 60 tiles x 8 .*mil.max_bag_gib"):
        fit_mil(config, store, records, tmp_path / "run", seed=0)
    assert counter.reads == 0
    fit_mil(config, store, records[:4], tmp_path / "run", seed=0)  # bags within the bound train
    assert counter.reads > 0


def test_the_mil_loop_runs_on_the_torch_threads_of_its_cpus(split_cohort, tmp_path, monkeypatch):
    """In the driver (workers 0, the default) as in a worker, the loop computes with mil.cpus_per_worker torch
    threads, not one per core of the node (a busy node then spins them: a 40-epoch round took 559 s instead of 16-38)."""
    import torch

    store, records = split_cohort
    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    for cpus in (1.0, 3.0):
        fit_mil(MILConfig(ensemble=1, epochs=1, workers=0, cpus_per_worker=cpus, min_val_bags=2), store, records,
                tmp_path / str(cpus), seed=0)
    assert threads == [1, 3]
