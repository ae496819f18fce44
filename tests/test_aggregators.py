"""MIL aggregators: registry, shapes, permutation symmetry and learning a toy MIL problem."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hnm_ray.core.errors import ConfigError
from hnm_ray.training.losses import class_pos_weight, pair_loss
from hnm_ray.models.aggregators import available_aggregators, build_aggregator, register_aggregator

NAMES = ["dsmil", "abmil"]


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"dsmil", "abmil"} <= set(available_aggregators())
    with pytest.raises(ConfigError, match="unknown aggregator"):
        build_aggregator("transmil", 8)
    with pytest.raises(ConfigError, match="plug-in"):
        build_aggregator("hnm_ray.models.dsmil:NoSuchThing", 8)
    with pytest.raises(ValueError, match="already registered"):
        register_aggregator("dsmil")(object)


def test_plugin_spec_builds_the_same_class():
    model = build_aggregator("hnm_ray.models.abmil:GatedABMIL", 8, hidden=4)
    assert type(model) is type(build_aggregator("abmil", 8))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 7, 500])
def test_shapes(name, n):
    torch.manual_seed(0)
    model = build_aggregator(name, 32, hidden=16, dropout=0.1).eval()
    features = torch.randn(n, 32)
    inst, bag = model(features)
    attention = model.attention(features)
    assert inst.shape == (n,) and bag.shape == () and attention.shape == (n,)
    assert torch.isfinite(inst).all() and torch.isfinite(bag)
    assert attention.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_rejects_wrong_feature_shape(name):
    model = build_aggregator(name, 32)
    for bad in (torch.randn(0, 32), torch.randn(5, 31), torch.randn(32)):
        with pytest.raises(ValueError, match="expects a bag"):
            model(bad)


@pytest.mark.parametrize("name", NAMES)
def test_permutation_equivariant_instances_invariant_bag(name):
    torch.manual_seed(1)
    model = build_aggregator(name, 24).eval()
    features = torch.randn(50, 24)
    perm = torch.randperm(50)
    inst, bag = model(features)
    inst_p, bag_p = model(features[perm])
    torch.testing.assert_close(inst_p, inst[perm])
    torch.testing.assert_close(bag_p, bag, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.attention(features[perm]), model.attention(features)[perm])


def _toy_bags(n_bags: int, dim: int, rng: np.random.Generator, direction: np.ndarray):
    """Gaussian bags of 10-39 tiles; positive bags hold 2-4 tiles shifted along `direction` ('tumour')."""
    bags = []
    for i in range(n_bags):
        label = i % 2
        features = rng.normal(size=(int(rng.integers(10, 40)), dim)).astype(np.float32)
        truth = np.zeros(len(features), dtype=np.int8)
        if label:
            idx = rng.choice(len(features), size=int(rng.integers(2, 5)), replace=False)
            features[idx] += 4.0 * direction
            truth[idx] = 1
        bags.append((torch.from_numpy(features), label, truth))
    return bags


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", NAMES)
def test_learns_toy_mil_problem(name, seed=0):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dim = 16
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    train, test = _toy_bags(400, dim, rng, direction), _toy_bags(100, dim, rng, direction)
    model = build_aggregator(name, dim, hidden=32)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    pos_weight = class_pos_weight([label for _, label, _ in train])
    positives = [b for b in train if b[1] == 1]
    negatives = [b for b in train if b[1] == 0]
    for _ in range(2):  # 2 epochs x 200 shuffled (positive, negative) pairs = 400 steps
        for p, n in zip(rng.permutation(len(positives)), rng.permutation(len(negatives))):
            loss = pair_loss(model(positives[p][0]), model(negatives[n][0]), pos_weight=pos_weight, k=2)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = [model(features) for features, _, _ in test]
    bag_scores = [torch.sigmoid(bag).item() for _, bag in outputs]
    assert roc_auc_score([label for _, label, _ in test], bag_scores) > 0.95
    inst_truth = np.concatenate([truth for _, label, truth in test if label])
    inst_scores = np.concatenate([inst.numpy() for (inst, _), (_, label, _) in zip(outputs, test) if label])
    assert roc_auc_score(inst_truth, inst_scores) > 0.95
    for (inst, _), (_, label, truth) in zip(outputs, test):
        if label:
            assert truth[int(inst.argmax())] == 1, "the top-scoring tile of a positive bag is a shifted one"



def test_its2clr_bag_vector_pooled_before_the_value_layer_equals_the_official_order(monkeypatch):
    """dsmil_its2clr computes W (sum_i A_i drop(h_i)) + b, not sum_i A_i (W drop(h_i) + b): its value layer sees one
    vector per bag, not every tile, and gives the same bag logit and the same gradients of every parameter as the
    official order, with dropout on (the same draws: same seed), on bags of 1 and 300 tiles."""
    torch.manual_seed(0)
    model = build_aggregator("dsmil_its2clr", 32, hidden=8, dropout=0.3).train()
    seen = []
    model.value[1].register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape)))

    def run(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(seed)
        inst, bag, _ = model.bag_output(x)
        (bag + inst.logsumexp(0)).backward()
        return bag.detach(), [p.grad.clone() for p in model.parameters()]

    for n in (1, 300):
        x = torch.randn(n, 32) * 2
        ours, ours_grads = run(x, n)
        assert seen[-1] == (32,), "the d x d value layer runs once per bag"
        with monkeypatch.context() as patch:
            patch.setattr(model, "pool", lambda attention, h: attention @ model.value(h))  # official: per tile
            official, official_grads = run(x, n)
        assert seen[-1] == (n, 32)
        assert torch.allclose(ours, official, atol=1e-5, rtol=1e-5), (ours, official)
        assert all(torch.allclose(g, h, atol=1e-5, rtol=1e-4) for g, h in zip(ours_grads, official_grads))
        assert all(g.abs().sum() > 0 for g in official_grads[6:8])  # the value layer's weight and bias learn


@pytest.mark.parametrize("name", ["dsmil", "dsmil_its2clr", "abmil"])
def test_a_large_bag_scored_in_chunks_gives_the_whole_bags_logits_holding_one_chunk(name):
    """Issue 25: evaluation put a whole bag through the aggregator (a 40,000-tile bag's standardised features and
    every layer's output at once). Above mil.eval_chunk_tiles a bag is scored in chunks without gradients: the
    instance and bag logits equal the whole bag's (float rounding of the softmax sums), no layer sees more than a
    chunk, and training still sees the whole bag."""
    from hnm_ray.models.aggregators import build_standardized

    torch.manual_seed(0)
    features = torch.randn(1000, 24) * 2 + 1
    model = build_standardized(name, 24, eval_chunk=128, hidden=16).eval()
    model.set_statistics(features.mean(0), features.std(0))
    whole = build_standardized(name, 24, eval_chunk=0, hidden=16).eval()
    whole.load_state_dict(model.state_dict())
    rows = []
    model.aggregator.instance_classifier.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    with torch.no_grad():
        (inst, bag), (inst_whole, bag_whole) = model(features), whole(features)
        torch.testing.assert_close(inst, inst_whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bag, bag_whole, rtol=1e-5, atol=1e-5)
        assert max(rows) <= 128 and sum(rows) >= 1000  # 8 chunks, never the whole bag
        torch.testing.assert_close(model.instance_logits(features), inst_whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(features.half())[1], whole(features.half())[1], rtol=1e-5, atol=1e-5)
    rows.clear()
    model(features)  # with gradients (training): the whole bag in one pass
    assert rows == [1000]
