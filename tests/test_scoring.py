"""Pseudo labels: the Ray Data scoring pass over the feature store and the hard negatives it feeds the miner."""
from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from hnm_ray.mining.scoring import SCORES_SCHEMA, InstanceScorer, count_tiles, score_tiles
from hnm_ray.store.manifest import load_manifest
from hnm_ray.config import MILConfig
from hnm_ray.models.inference import load_aggregator, save_aggregator
from hnm_ray.training.mil import fit_mil

NEG_RATIO = 0.2


@pytest.fixture(scope="module")
def trained(ray_session, mil_store, mil_cohort, tmp_path_factory):
    """A briefly trained aggregator on the demo features (driver mode) and the manifest records."""
    records = load_manifest(mil_cohort)
    run_dir = tmp_path_factory.mktemp("scoring_mil")
    result = fit_mil(MILConfig(ensemble=1, workers=0, epochs=20, lr=3e-3), mil_store, records, run_dir, seed=0)
    return result.model_path, records


def direct_logits(model_path, store, slide_ids) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Instance logits of each slide's bag computed directly with the saved aggregator: slide -> (tile_ids, logits)."""
    model, _ = load_aggregator(model_path)
    out = {}
    with torch.no_grad():
        for slide_id in slide_ids:
            bag = store.read_bag(slide_id)
            out[slide_id] = bag.tile_ids, model(torch.from_numpy(bag.features))[0].numpy()
    return out


def reference_top_k(logits: dict[str, tuple[np.ndarray, np.ndarray]], k: int) -> list[tuple[str, int]]:
    """numpy top-k by logit (desc), ties by slide_id then tile_id, as the miner orders them."""
    rows = [(float(s), slide, int(t)) for slide, (tiles, scores) in logits.items() for t, s in zip(tiles, scores)]
    scores = np.array([r[0] for r in rows], dtype=np.float32)
    slides = np.array([r[1] for r in rows])
    tiles = np.array([r[2] for r in rows])
    order = np.lexsort((tiles, slides, -scores))[:k]
    return [(str(slides[i]), int(tiles[i])) for i in order]


@pytest.mark.ray
@pytest.mark.timeout(400)
@pytest.mark.parametrize("in_process", [False, True], ids=["ray_data_actors", "in_process"])
def test_score_tiles_scores_every_tile_and_mines_the_exact_top_k(trained, mil_store, tmp_path, in_process):
    """The same table and the same global top-k whether a Ray Data actor pool scores (a cluster) or the driver
    scores slide by slide (one node, the default there)."""
    import ray

    from hnm_ray.mining.miner import get_miner

    model_path, records = trained
    wanted = [r for r in records if r.split == "train"]
    negatives = [r.slide_id for r in wanted if r.label == 0]
    n_neg = count_tiles(mil_store, negatives)
    assert n_neg == sum(len(mil_store.read_bag(s)) for s in negatives)
    miner_name = f"test_scoring_miner_{in_process}"
    miner = get_miner(miner_name)
    k = ray.get(miner.begin_round.remote(n_neg, NEG_RATIO))
    assert k == math.ceil(NEG_RATIO * n_neg)

    out = tmp_path / "scores.parquet"
    table = score_tiles(model_path, mil_store, wanted, out, miner_name=miner_name, batch_size=100,
                        in_process=in_process)

    # one row per tile of the requested slides, nothing else, sorted, written as returned
    assert table.schema == SCORES_SCHEMA
    assert pq.read_table(out).equals(table)
    expected = direct_logits(model_path, mil_store, [r.slide_id for r in wanted])
    assert table.num_rows == count_tiles(mil_store, list(expected)) == sum(len(t) for t, _ in expected.values())
    assert set(table["slide_id"].to_pylist()) == set(expected)
    for slide_id, (tiles, logits) in expected.items():
        rows = table.filter(np.asarray(table["slide_id"].to_pylist()) == slide_id)
        assert rows["tile_id"].to_numpy().tolist() == sorted(tiles.tolist())
        order = np.argsort(tiles)
        np.testing.assert_allclose(rows["logit"].to_numpy(), logits[order], rtol=1e-5, atol=1e-5)
    logit = table["logit"].to_numpy()
    np.testing.assert_allclose(table["score"].to_numpy(), 1 / (1 + np.exp(-logit.astype(np.float64))), atol=1e-6)

    # the miner saw every negative tile once and holds exactly the global top-k by logit
    stats = ray.get(miner.stats.remote())
    assert stats["pushed"] == stats["seen"] == n_neg and stats["size"] == k
    hard = ray.get(miner.hard_negatives.remote())
    assert hard.num_rows == k
    assert list(zip(hard["slide_id"].to_pylist(), hard["tile_id"].to_pylist())) == \
        reference_top_k({s: expected[s] for s in negatives}, k)
    negative_rows = table.filter(np.isin(np.asarray(table["slide_id"].to_pylist()), negatives))
    kth = np.sort(negative_rows["logit"].to_numpy())[::-1][k - 1]
    assert stats["threshold"] == pytest.approx(float(kth))  # the miner's threshold is a logit
    ray.kill(miner)


@pytest.mark.ray
@pytest.mark.timeout(400)
def test_saturated_probabilities_still_mine_by_logit(trained, mil_store, tmp_path):
    """With confident models p = sigmoid(logit) rounds to 1.0 in float32; the miner ranks logits, so no ties."""
    import ray

    from hnm_ray.mining.miner import get_miner

    model_path, records = trained
    model, meta = load_aggregator(model_path)
    state = {k: v * 200 if k.startswith("aggregator.instance_classifier") else v for k, v in model.state_dict().items()}
    confident = save_aggregator(tmp_path / "confident", state, meta)
    negatives = [r.slide_id for r in records if r.split == "train" and r.label == 0]
    n_neg = count_tiles(mil_store, negatives)
    miner = get_miner("test_scoring_saturated")
    k = ray.get(miner.begin_round.remote(n_neg, NEG_RATIO))
    scorer = InstanceScorer(str(confident), "test_scoring_saturated", negatives)
    for slide_id in negatives:
        table = mil_store.read_table(slide_id, columns=["slide_id", "tile_id", "embedding"])
        batch = {"slide_id": np.asarray(table["slide_id"].to_pylist()), "tile_id": table["tile_id"].to_numpy(),
                 "embedding": table["embedding"].combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)}
        out = scorer(batch)
        np.testing.assert_array_equal(out["score"], torch.sigmoid(torch.from_numpy(out["logit"])).numpy())
    expected = direct_logits(confident, mil_store, negatives)
    all_logits = np.concatenate([logits for _, logits in expected.values()])
    top = np.sort(all_logits)[::-1][:k]
    p_top = torch.sigmoid(torch.from_numpy(top.copy())).numpy()
    assert len(np.unique(p_top)) < k, "the test needs float32 ties of p (0 or 1) among the top-k"
    hard = ray.get(miner.hard_negatives.remote())
    assert list(zip(hard["slide_id"].to_pylist(), hard["tile_id"].to_pylist())) == reference_top_k(expected, k)
    ray.kill(miner)
