"""Losses: hand-computed ranking loss values and gradients, BCE composition, SupCon against a loop reference."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hnm_ray.training.losses import (bag_bce, bags_bce, class_pos_weight, global_ranking_loss, pair_loss, ranking_loss,
                                     supcon_loss, topk_mean)

S_POS = [3.0, 1.0, -2.0, 0.5]
S_NEG = [0.0, 2.0, -1.0]


def test_topk_mean_clips_k_and_rejects_bad_input():
    s = torch.tensor(S_POS)
    assert topk_mean(s, 1).item() == 3.0
    assert topk_mean(s, 2).item() == 2.0
    assert topk_mean(s, 100).item() == pytest.approx(0.625)
    with pytest.raises(ValueError):
        topk_mean(s, 0)
    with pytest.raises(ValueError):
        topk_mean(torch.tensor([]), 1)
    with pytest.raises(ValueError):
        topk_mean(s.reshape(2, 2), 1)


@pytest.mark.parametrize("k, margin, expected", [
    (1, 1.0, 0.0),              # 1 + 2 - 3
    (1, 2.0, 1.0),              # 2 + 2 - 3
    (2, 1.0, 0.0),              # 1 + (2+0)/2 - (3+1)/2
    (2, 1.5, 0.5),              # 1.5 + 1 - 2
    (3, 1.0, 0.0),              # 1 + 1/3 - 1.5 < 0
    (3, 2.0, 2 + 1 / 3 - 1.5),  # 0.8333...
    (10, 1.0, 1 + 1 / 3 - 0.625),  # k clipped: all 4 positives, all 3 negatives
])
def test_ranking_loss_hand_values(k, margin, expected):
    loss = ranking_loss(torch.tensor(S_POS), torch.tensor(S_NEG), margin=margin, k=k)
    assert loss.item() == pytest.approx(expected)


def test_ranking_loss_gradient_pushes_positive_topk_up_and_negative_topk_down():
    s_pos = torch.tensor(S_POS, requires_grad=True)
    s_neg = torch.tensor(S_NEG, requires_grad=True)
    loss = ranking_loss(s_pos, s_neg, margin=2.0, k=2)
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    # Gradient descent moves against the gradient: positive top-2 (idx 0, 1) up, negative top-2 (idx 1, 0) down.
    assert s_pos.grad.tolist() == pytest.approx([-0.5, -0.5, 0.0, 0.0])
    assert s_neg.grad.tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_ranking_loss_has_no_gradient_when_margin_satisfied():
    s_pos = torch.tensor(S_POS, requires_grad=True)
    s_neg = torch.tensor(S_NEG, requires_grad=True)
    loss = ranking_loss(s_pos, s_neg, margin=0.5, k=2)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(s_pos.grad == 0) and torch.all(s_neg.grad == 0)


def test_global_ranking_loss_hand_values_and_forms():
    bags = [torch.tensor([3.0, 1.0]), torch.tensor([0.5, -1.0, 0.0])]
    hard = torch.tensor(S_NEG)
    # k=1: negative top-1 = 2; bag 1: relu(1+2-3)=0, bag 2: relu(1+2-0.5)=2.5
    assert global_ranking_loss(bags, hard, margin=1.0, k=1).item() == pytest.approx(1.25)
    # k=2: negative top-2 mean = 1; bag 1: relu(1+1-2)=0, bag 2: relu(1+1-0.25)=1.75
    assert global_ranking_loss(bags, hard, margin=1.0, k=2).item() == pytest.approx(0.875)
    single = global_ranking_loss(bags[1], hard, margin=1.0, k=1)
    assert single.item() == pytest.approx(2.5)
    rows = torch.tensor([[3.0, 1.0, -5.0], [0.5, -1.0, 0.0]])
    assert global_ranking_loss(rows, hard, k=2).item() == pytest.approx(
        global_ranking_loss(list(rows), hard, k=2).item())
    with pytest.raises(ValueError):
        global_ranking_loss([], hard)


def _reference_bce_terms(bag_logit, inst_logits, y, pos_weight):
    criterion = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(pos_weight))
    target = torch.tensor([[float(y)]])
    return (criterion(bag_logit.view(1, -1), target),
            criterion(torch.max(inst_logits, 0)[0].view(1, -1), target))


@pytest.mark.parametrize("y", [0, 1])
def test_bag_bce_matches_composed_torch_reference(y):
    gen = torch.Generator().manual_seed(0)
    inst = torch.randn(9, generator=gen)
    bag = torch.randn((), generator=gen)
    bag_term, max_term = _reference_bce_terms(bag, inst, y, 2.5)
    expected = 0.3 * bag_term + 0.7 * max_term
    assert bag_bce(bag, inst, y, 2.5, w_bag=0.3, w_ins=0.7).item() == pytest.approx(expected.item(), rel=1e-6)
    # by hand for one term: y=1 -> -pw*log(sigmoid(x)); y=0 -> -log(1-sigmoid(x))
    x = inst.max()
    hand = -2.5 * math.log(torch.sigmoid(x).item()) if y == 1 else -math.log(1 - torch.sigmoid(x).item())
    assert bag_bce(bag, inst, y, 2.5, w_bag=0.0, w_ins=1.0).item() == pytest.approx(hand, rel=1e-5)
    assert bag_bce(bag, inst, torch.tensor(y), None).item() == pytest.approx(
        bag_bce(bag, inst, y, 1.0).item(), rel=1e-6)


@pytest.mark.parametrize("pos_weight", [None, 2.5])
def test_bags_bce_gives_each_bag_its_bag_bce(pos_weight):
    gen = torch.Generator().manual_seed(3)
    bags = [torch.randn(n, generator=gen) for n in (1, 4, 9, 30)]
    bag_logits = torch.randn(len(bags), generator=gen)
    labels = [1, 0, 0, 1]
    batched = bags_bce(bag_logits, torch.stack([b.max() for b in bags]), torch.tensor(labels), pos_weight, 0.3, 0.7)
    one_by_one = [bag_bce(logit, inst, y, pos_weight, 0.3, 0.7) for logit, inst, y in zip(bag_logits, bags, labels)]
    assert batched.shape == (len(bags),)
    assert batched.tolist() == [x.item() for x in one_by_one]


def test_pair_loss_matches_official_composition():
    gen = torch.Generator().manual_seed(1)
    pos_inst, neg_inst = torch.randn(12, generator=gen), torch.randn(15, generator=gen)
    pos_bag, neg_bag = torch.randn((), generator=gen), torch.randn((), generator=gen)
    pb, pm = _reference_bce_terms(pos_bag, pos_inst, 1, 0.8)
    nb, nm = _reference_bce_terms(neg_bag, neg_inst, 0, 0.8)
    rank = F.relu(1.0 + torch.topk(neg_inst, 3).values.mean() - torch.topk(pos_inst, 3).values.mean())
    expected = 0.5 * (pb + nb) / 2 + 0.5 * (pm + nm) / 2 + 0.1 * rank
    got = pair_loss((pos_inst, pos_bag), (neg_inst, neg_bag), pos_weight=0.8, w_rank=0.1, margin=1.0, k=3)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    no_rank = pair_loss((pos_inst, pos_bag), (neg_inst, neg_bag), pos_weight=0.8, w_rank=0.0)
    assert no_rank.item() == pytest.approx((expected - 0.1 * rank).item(), rel=1e-6)


def test_class_pos_weight():
    assert class_pos_weight([1, 0, 0, 1, 0]) == pytest.approx(1.5)
    assert class_pos_weight(torch.tensor([1, 1, 1, 0]).numpy()) == pytest.approx(1 / 3)
    for bad in ([0, 0], [1, 1], [0, 1, 2]):
        with pytest.raises(ValueError):
            class_pos_weight(bad)


def _supcon_reference(z1, z2, labels, temperature, anchor_mask):
    """Loop-by-loop SupCon (Khosla et al. eq. 2) over the 2B views, averaged over anchor views."""
    batch = z1.shape[0]
    f = F.normalize(torch.cat([z1, z2]), dim=1)
    ids = list(range(batch)) * 2 if labels is None else labels.tolist() * 2
    losses = []
    for i in range(2 * batch):
        if anchor_mask is not None and not bool(anchor_mask[i % batch]):
            continue
        denominator = sum(math.exp(float(f[i] @ f[a]) / temperature) for a in range(2 * batch) if a != i)
        terms = [float(f[i] @ f[p]) / temperature - math.log(denominator)
                 for p in range(2 * batch) if p != i and ids[p] == ids[i]]
        losses.append(-sum(terms) / len(terms))
    return sum(losses) / len(losses)


def _views(batch=10, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    z2 = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (batch,), generator=gen)
    return z1, z2, labels


@pytest.mark.parametrize("use_labels", [True, False])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_supcon_matches_loop_reference(use_labels, temperature):
    z1, z2, labels = _views()
    labels = labels if use_labels else None
    got = supcon_loss(z1, z2, labels, temperature=temperature, base_temperature=temperature)
    assert got.item() == pytest.approx(_supcon_reference(z1, z2, labels, temperature, None), rel=1e-9)


def test_supcon_scales_by_temperature_over_base_temperature():
    z1, z2, labels = _views()
    plain = supcon_loss(z1, z2, labels, temperature=0.5, base_temperature=0.5)
    scaled = supcon_loss(z1, z2, labels, temperature=0.5)
    assert scaled.item() == pytest.approx(plain.item() * 0.5 / 0.07, rel=1e-9)


def test_supcon_permutation_and_view_swap_invariant():
    z1, z2, labels = _views(seed=3)
    mask = labels == 0
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(4))
    base = supcon_loss(z1, z2, labels, anchor_mask=mask)
    assert supcon_loss(z1[perm], z2[perm], labels[perm], anchor_mask=mask[perm]).item() == pytest.approx(base.item())
    assert supcon_loss(z2, z1, labels, anchor_mask=mask).item() == pytest.approx(base.item())


def test_supcon_lower_for_aligned_views_than_random():
    gen = torch.Generator().manual_seed(5)
    z1 = torch.randn(32, 16, generator=gen)
    aligned = supcon_loss(z1, z1 + 0.05 * torch.randn(32, 16, generator=gen))
    unrelated = supcon_loss(z1, torch.randn(32, 16, generator=gen))
    assert aligned.item() < unrelated.item() - 1.0


def test_supcon_anchor_mask_restricts_anchors():
    z1, z2, labels = _views(batch=12, seed=6)
    negatives_as_anchors = labels == 0
    got = supcon_loss(z1, z2, labels, anchor_mask=negatives_as_anchors)
    expected = _supcon_reference(z1, z2, labels, 0.07, negatives_as_anchors)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert got.item() != pytest.approx(supcon_loss(z1, z2, labels).item())
    everyone = torch.ones(12, dtype=torch.bool)
    assert supcon_loss(z1, z2, labels, anchor_mask=everyone).item() == pytest.approx(supcon_loss(z1, z2, labels).item())


def test_supcon_without_anchors_is_a_differentiable_zero():
    z1, z2, labels = _views(seed=7)
    z1.requires_grad_(True)
    loss = supcon_loss(z1, z2, labels, anchor_mask=torch.zeros(len(labels), dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.all(z1.grad == 0)


def test_supcon_stable_at_tiny_temperature_and_gradients_finite():
    gen = torch.Generator().manual_seed(8)
    z1 = (100 * torch.randn(16, 8, generator=gen)).requires_grad_(True)
    z2 = 100 * torch.randn(16, 8, generator=gen)
    loss = supcon_loss(z1, z2, torch.randint(0, 2, (16,), generator=gen), temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()


def test_supcon_rejects_mismatched_shapes():
    z1, z2, labels = _views()
    with pytest.raises(ValueError):
        supcon_loss(z1, z2[:-1])
    with pytest.raises(ValueError):
        supcon_loss(z1, z2, labels[:-1])
    with pytest.raises(ValueError):
        supcon_loss(z1, z2, labels, anchor_mask=torch.ones(3, dtype=torch.bool))
