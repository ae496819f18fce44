"""The official ItS2CLR/HNM-WSI building blocks, each against an independent restatement (float64, max abs diff <= 1e-9).

The restatements follow the official code (winston52/HNM-WSI, train/): loss/losses.py SupConLoss,
models/dsmil.py BClassifier, trainer.py schedulers and update gate, dataset/dataloader_simCLR.py selections.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hnm_ray.training.augment import AugmentConfig, augment, official_pipeline, two_views
from hnm_ray.core.errors import ConfigError
from hnm_ray.training.losses import supcon_loss, supcon_official, supcon_step_a, supcon_step_b
from hnm_ray.mining.selection import adopt_round, select_positives, uncertain_negatives
from hnm_ray.models.aggregators import available_aggregators, build_aggregator
from hnm_ray.models.encoders import resnet18_in, to_model_input
from hnm_ray.models.weights import load_official_simclr, official_simclr_state
from hnm_ray.training.schedules import lr_at, scheduler

TOL = 1e-9
SEEDS = range(5)


# ---------------------------------------------------------------- SupCon (official fine-tuning loss)

def _reference_supcon(z1, z2, labels, bag_labels, pair_mode, mask_uncertain_neg, temperature=0.07,
                      base_temperature=0.07, eps=0.0):
    """Official SupConLoss.forward (contrast_mode 'all') on L2-normalised views; eps=1e-10 is the official epsilon."""
    features = torch.stack([F.normalize(z1, dim=1), F.normalize(z2, dim=1)], dim=1)
    n = features.shape[0]
    lab = labels.view(-1, 1)
    mask = torch.eq(lab, lab.T).double()
    if pair_mode == 1:
        mask[lab[:, 0] == 0, :] = 0
        mask[:, lab[:, 0] == 0] = 0
    elif pair_mode == 2:
        mask[lab[:, 0] == 1, :] = 0
        mask[:, lab[:, 0] == 1] = 0
    contrast = torch.cat(torch.unbind(features, dim=1), dim=0)
    logits = contrast @ contrast.T / temperature
    mask = mask.repeat(2, 2)
    logits_mask = torch.ones_like(mask)
    logits_mask[torch.arange(2 * n), torch.arange(2 * n)] = 0
    if mask_uncertain_neg:
        uncertain = ((bag_labels == 1) & (labels == 0)).repeat(2)
        logits_mask[:, uncertain] = 0
    mask = mask * logits_mask
    log_prob = logits - torch.log((torch.exp(logits) * logits_mask).sum(1, keepdim=True) + eps)
    count = mask.sum(1) + eps if eps else mask.sum(1).clamp(min=1)  # official: + 1e-10, so no positive -> 0
    mean_log_prob_pos = (mask * log_prob).sum(1) / count
    return (-(temperature / base_temperature) * mean_log_prob_pos).view(2, n).mean()


def _batch(seed: int, n: int, d: int, uncertain: bool = True):
    """Random float64 views and pseudo labels: label 1 only in positive slides, both classes present."""
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(n, d, generator=gen, dtype=torch.float64)
    labels = torch.zeros(n, dtype=torch.long)
    labels[: max(1, n // 4)] = 1
    labels = labels[torch.randperm(n, generator=gen)]
    bag_labels = labels.clone()
    if uncertain:
        bag_labels[(torch.rand(n, generator=gen, dtype=torch.float64) < 0.3) & (labels == 0)] = 1
    return z1, z2, labels, bag_labels


def _value_and_grads(fn, z1, z2):
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    loss = fn(a, b)
    loss.backward()
    return loss.detach(), a.grad, b.grad


def _assert_same(ours, reference):
    for x, y in zip(ours, reference):
        assert (x - y).abs().max().item() <= TOL


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d", [(4, 3), (17, 8), (64, 32)])
@pytest.mark.parametrize("mask_uncertain_neg", [True, False])
def test_supcon_step_a_matches_official(seed, n, d, mask_uncertain_neg):
    z1, z2, labels, bag_labels = _batch(seed, n, d)
    ours = _value_and_grads(lambda a, b: supcon_step_a(a, b, labels, bag_labels, mask_uncertain_neg=mask_uncertain_neg),
                            z1, z2)
    reference = _value_and_grads(lambda a, b: _reference_supcon(a, b, labels, bag_labels, 2, mask_uncertain_neg), z1, z2)
    _assert_same(ours, reference)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d", [(4, 3), (17, 8), (64, 32)])
def test_supcon_step_b_matches_official(seed, n, d):
    z1, z2, labels, bag_labels = _batch(seed, n, d)
    ours = _value_and_grads(lambda a, b: supcon_step_b(a, b, labels), z1, z2)
    reference = _value_and_grads(lambda a, b: _reference_supcon(a, b, labels, bag_labels, 1, False), z1, z2)
    _assert_same(ours, reference)


@pytest.mark.parametrize("seed", SEEDS)
def test_supcon_official_temperatures_and_official_epsilons(seed):
    z1, z2, labels, bag_labels = _batch(seed, 23, 6)
    ours = supcon_step_a(z1, z2, labels, bag_labels, temperature=0.5, base_temperature=0.1)
    assert abs(ours - _reference_supcon(z1, z2, labels, bag_labels, 2, True, 0.5, 0.1)).item() <= TOL
    # The official 1e-10 epsilons are the only difference left: relative size ~1e-10.
    with_eps = _reference_supcon(z1, z2, labels, bag_labels, 2, True, eps=1e-10)
    assert abs(supcon_step_a(z1, z2, labels, bag_labels) - with_eps).item() <= 1e-8 * abs(with_eps).item()


@pytest.mark.parametrize("seed", SEEDS)
def test_supcon_official_is_the_2n_view_mean_not_the_anchor_mean(seed):
    """Step B against supcon_loss (anchor mean): same per-anchor terms, scaled by #anchor views / 2N."""
    z1, z2, labels, _ = _batch(seed, 40, 8)
    anchors = labels == 1
    ours = supcon_step_b(z1, z2, labels)
    anchor_mean = supcon_loss(z1, z2, labels, anchor_mask=anchors)
    assert abs(ours - anchor_mean * anchors.sum() / len(labels)).item() <= TOL


def test_supcon_official_without_anchors_is_zero_and_differentiable():
    z1, z2, labels, _ = _batch(0, 6, 4)
    z1.requires_grad_()
    loss = supcon_official(z1, z2, labels, torch.zeros(6, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(z1.grad, torch.zeros_like(z1))
    with pytest.raises(ValueError, match="one entry per sample"):
        supcon_official(z1, z2, labels[:5], labels[:5] == 0)


# ---------------------------------------------------------------- dsmil_its2clr aggregator

def _reference_dsmil(model, x):
    """Official MILNet(FCLayer, BClassifier(nonlinear=True)).forward restated from the module's weights, eval mode."""
    w = {k: v.double() for k, v in model.state_dict().items()}
    classes = x @ w["instance_classifier.weight"].T + w["instance_classifier.bias"]
    feats = torch.relu(x @ w["transform.0.weight"].T + w["transform.0.bias"])
    v = feats @ w["value.1.weight"].T + w["value.1.bias"]
    q = torch.tanh(feats @ w["query.0.weight"].T + w["query.0.bias"])
    m_indices = torch.sort(classes, 0, descending=True)[1]
    q_max = torch.tanh(feats[m_indices[0, :]] @ w["query.0.weight"].T + w["query.0.bias"])
    a = F.softmax(q @ q_max.T / math.sqrt(q.shape[1]), 0)
    b = a.T @ v
    c = b @ w["bag_classifier.weight"].T + w["bag_classifier.bias"]
    return classes[:, 0], c.reshape(()), a[:, 0]


def test_dsmil_its2clr_is_registered_and_has_592002_parameters_at_512():
    assert "dsmil_its2clr" in available_aggregators()
    model = build_aggregator("dsmil_its2clr", 512)
    d, h = 512, 128
    official = (d + 1) + (d * d + d) + (d * h + h) + (d * d + d) + (d + 1)  # FCLayer, lin, q, v, fcc (Conv1d(1, 1, d))
    assert sum(p.numel() for p in model.parameters()) == official == 592_002


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n,d", [(1, 4), (9, 16), (200, 64)])
def test_dsmil_its2clr_matches_official_forward(seed, n, d):
    torch.manual_seed(seed)
    model = build_aggregator("dsmil_its2clr", d, dropout=0.25).double().eval()
    x = torch.randn(n, d, dtype=torch.float64)
    out = model.bag_output(x)
    reference = _reference_dsmil(model, x)
    for ours, ref in zip(out, reference):
        assert (ours - ref).abs().max().item() <= TOL


def test_dsmil_its2clr_forward_on_a_hand_checked_bag():
    model = build_aggregator("dsmil_its2clr", 2, hidden=2).double().eval()
    eye = torch.eye(2, dtype=torch.float64)
    with torch.no_grad():
        for layer in (model.transform[0], model.query[0], model.value[1]):
            layer.weight.copy_(eye)
            layer.bias.zero_()
        model.instance_classifier.weight.copy_(torch.tensor([[1.0, 0.0]]))
        model.instance_classifier.bias.zero_()
        model.bag_classifier.weight.copy_(torch.tensor([[1.0, 1.0]]))
        model.bag_classifier.bias.fill_(0.5)
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0]], dtype=torch.float64)
    # instance logits = x[:, 0] = (1, 0, -1): tile 0 is critical; relu(x) = (1, 0), (0, 2), (0, 1);
    # queries tanh(relu(x)); scores q_i . q_0 / sqrt(2) = (tanh(1)^2 / sqrt(2), 0, 0).
    s = math.tanh(1.0) ** 2 / math.sqrt(2.0)
    a0 = math.exp(s) / (math.exp(s) + 2)
    a1 = a2 = 1 / (math.exp(s) + 2)
    bag = a0 * 1.0 + (a1 * 2.0 + a2 * 1.0) + 0.5
    inst, bag_logit = model(x)
    assert inst.tolist() == [1.0, 0.0, -1.0]
    assert abs(bag_logit.item() - bag) <= TOL
    assert (model.attention(x) - torch.tensor([a0, a1, a2], dtype=torch.float64)).abs().max().item() <= TOL


def test_critical_instance_comes_from_the_raw_features():
    """The instance classifier scores raw x; with relu(x) the other tile would win."""
    model = build_aggregator("dsmil_its2clr", 2, hidden=2).double().eval()
    with torch.no_grad():
        model.instance_classifier.weight.copy_(torch.tensor([[-1.0, 0.0]]))
        model.instance_classifier.bias.zero_()
    x = torch.tensor([[-3.0, 1.0], [2.0, 1.0]], dtype=torch.float64)
    _, _, attention = _reference_dsmil(model, x)
    assert torch.allclose(model.attention(x), attention, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", ["dsmil", "dsmil_its2clr", "abmil"])
def test_instance_logits_equal_the_forward_ones(name):
    torch.manual_seed(0)
    model = build_aggregator(name, 12).eval()
    x = torch.randn(30, 12)
    assert torch.equal(model.instance_logits(x), model(x)[0])


@pytest.mark.parametrize("name", ["dsmil", "dsmil_its2clr"])
def test_dsmil_instance_logits_skip_the_bag_branch(name, monkeypatch):
    model = build_aggregator(name, 12)

    def boom(*_):
        raise AssertionError("bag branch ran")

    monkeypatch.setattr(model, "bag_output", boom)
    assert model.instance_logits(torch.randn(5, 12)).shape == (5,)
    with pytest.raises(ValueError, match="expects a bag"):
        model.instance_logits(torch.randn(5, 11))


# ---------------------------------------------------------------- official augmentations (kornia)

def _tiles(seed: int, n: int = 4, size: int = 48) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_official_pipeline_has_the_official_values():
    crop, flip, jitter, grey, blur = official_pipeline(224)
    assert crop.flags["size"] == (224, 224) and tuple(crop._param_generator.scale) == (0.08, 1.0)
    assert flip.p == 0.5
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue, jitter.p) == (0.8, 0.8, 0.8, 0.2, 0.8)
    assert grey.p == 0.2
    assert blur.flags["kernel_size"] == (13, 13) and tuple(blur._param_generator.sigma) == (0.1, 2.0) and blur.p == 0.5


@pytest.mark.parametrize("seed", range(3))
def test_official_views_are_seeded_by_the_generator_only(seed):
    tiles = _tiles(seed)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = two_views(tiles, AugmentConfig(out_size=32), torch.Generator().manual_seed(seed), "official")
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    again = two_views(tiles, AugmentConfig(out_size=32), torch.Generator().manual_seed(seed), "official")
    other = two_views(tiles, AugmentConfig(out_size=32), torch.Generator().manual_seed(seed + 100), "official")
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], other[0])
    assert first[0].shape == (4, 32, 32, 3) and first[0].dtype == torch.uint8


def test_ours_is_unchanged_and_unknown_names_fail():
    tiles = _tiles(0)
    views = two_views(tiles, AugmentConfig(), torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)
    assert torch.equal(views[0], augment(tiles, AugmentConfig(), gen))
    assert torch.equal(views[1], augment(tiles, AugmentConfig(), gen))
    with pytest.raises(ValueError, match="unknown augmentation"):
        two_views(tiles, AugmentConfig(), gen, "torchvision")


def test_official_colour_steps_see_bgr(monkeypatch):
    """As in the official code (cv2 BGR into RGB transforms): grayscale weighs B by 0.299 and R by 0.114."""
    import kornia.augmentation as K

    monkeypatch.setattr("hnm_ray.training.augment.official_pipeline", lambda out: nn.Sequential(K.RandomGrayscale(p=1.0)))
    tiles = _tiles(1)
    out = two_views(tiles, AugmentConfig(), torch.Generator().manual_seed(0), "official")[0]
    rgb = tiles.double() / 255.0
    grey = 0.299 * rgb[..., 2] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 0]
    expected = (grey * 255.0).round()
    assert (out[..., 0].double() - expected).abs().max().item() <= 1.0
    assert torch.equal(out[..., 0], out[..., 2])


# ---------------------------------------------------------------- learning-rate schedules

def _official_mil_lrs(epochs: int, base_lr: float) -> list[float]:
    """trainer.py train_MIL: StepLR(75, gamma=0.5), scheduler.step() twice per epoch; the lr each epoch trains with."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    step = torch.optim.lr_scheduler.StepLR(optimizer, 75, gamma=0.5)
    lrs = []
    for _ in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        step.step()
        step.step()
    return lrs


def _official_finetune_lrs(epochs: int, base_lr: float) -> list[float]:
    """trainer.py train: CosineAnnealingLR(T_max=epochs, eta_min=0), stepped after an epoch only if epoch >= 10."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0)
    lrs = []
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if epoch >= 10:
            cosine.step()
    return lrs


@pytest.mark.parametrize("epochs,base_lr", [(350, 2e-4), (200, 1e-3), (40, 0.5)])
def test_mil_step_schedule_matches_official_steplr(epochs, base_lr):
    official = _official_mil_lrs(epochs, base_lr)
    formula = [base_lr * 0.5 ** math.floor(2 * e / 75) for e in range(epochs)]
    ours = [lr_at("mil_step_official", e, base_lr, epochs) for e in range(epochs)]
    assert max(abs(a - b) for a, b in zip(ours, official)) <= TOL
    assert max(abs(a - b) for a, b in zip(ours, formula)) <= TOL
    assert ours[37] == base_lr and ours[38] == base_lr / 2  # 2 * 38 = 76 steps


@pytest.mark.parametrize("epochs,base_lr", [(100, 0.01), (30, 1.0), (11, 0.3)])
def test_finetune_cosine_official_matches_cosine_annealing_from_epoch_10(epochs, base_lr):
    official = _official_finetune_lrs(epochs, base_lr)
    formula = [base_lr * (1 + math.cos(math.pi * max(e - 10, 0) / epochs)) / 2 for e in range(epochs)]
    ours = [lr_at("cosine_official", e, base_lr, epochs) for e in range(epochs)]
    assert max(abs(a - b) for a, b in zip(ours, official)) <= TOL
    assert max(abs(a - b) for a, b in zip(ours, formula)) <= TOL


@pytest.mark.parametrize("epochs,first", [(4, 0), (20, 5), (7, 3)])
def test_our_schedules_and_the_lambdalr_factory(epochs, first):
    base_lr = 0.01
    for e in range(epochs + 2):
        assert lr_at("constant", e, base_lr, epochs) == base_lr
        expected = base_lr * 0.5 * (1 + math.cos(math.pi * min(e, epochs) / epochs))
        assert abs(lr_at("cosine", e, base_lr, epochs) - expected) <= TOL
    for name in ("constant", "mil_step_official", "cosine", "cosine_official"):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base_lr)
        sched = scheduler(optimizer, name, epochs, first_epoch=first)
        for e in range(epochs - first):
            assert abs(optimizer.param_groups[0]["lr"] - lr_at(name, e + first, base_lr, epochs)) <= TOL
            optimizer.step()
            sched.step()
    with pytest.raises(ValueError, match="unknown learning-rate schedule"):
        lr_at("linear", 0, 0.1, 10)


# ---------------------------------------------------------------- uncertain negatives and the update gate

def _positive_slide_tiles(seed: int, n: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    scores = np.round(rng.random(n), 2).astype(np.float32)  # rounding makes ties
    return pa.table({"slide_id": pa.array([f"tumor_{i % 3:03d}" for i in range(n)]),
                     "tile_id": pa.array(rng.permutation(n), pa.int32()),
                     "score": pa.array(scores, pa.float32())})


def _reference_uncertain(table: pa.Table, threshold: float, ratio: float) -> list[tuple[str, int]]:
    """InssepSPLDataset.init_bag (negative side, mask_uncertain_neg False): quantile(ratio) of p <= threshold, keep p <= it."""
    rows = list(zip(table["slide_id"].to_pylist(), table["tile_id"].to_pylist(), table["score"].to_pylist()))
    below = [r for r in rows if np.float32(r[2]) <= np.float32(threshold)]
    if not below:
        return []
    values = sorted(r[2] for r in below)
    position = ratio * (len(values) - 1)
    low = math.floor(position)
    cut = values[low] + (values[min(low + 1, len(values) - 1)] - values[low]) * (position - low)
    return [(s, t) for s, t, p in sorted(below, key=lambda r: (r[2], r[0], r[1])) if p <= cut]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n", [1, 7, 50, 400])
@pytest.mark.parametrize("ratio", [0.2, 0.35, 0.8, 1.0])
def test_uncertain_negatives_match_the_official_selection(seed, n, ratio):
    table = _positive_slide_tiles(seed, n)
    ours = uncertain_negatives(table, 0.3, ratio=ratio)
    assert list(zip(ours["slide_id"].to_pylist(), ours["tile_id"].to_pylist())) == _reference_uncertain(table, 0.3, ratio)
    # The candidates are exactly the complement of select_positives' candidates (p > threshold).
    everything = uncertain_negatives(table, 0.3, ratio=1.0).num_rows + select_positives(table, 0.3, ratio=1.0).num_rows
    assert everything == n


def test_uncertain_negatives_without_ties_keep_floor_ratio_n_minus_1_plus_1():
    scores = np.linspace(0.0, 0.29, 41).astype(np.float32)
    table = pa.table({"slide_id": ["s"] * 41, "tile_id": pa.array(range(41), pa.int32()), "score": scores})
    for ratio in (0.2, 0.5, 0.8):
        assert uncertain_negatives(table, ratio=ratio).num_rows == math.floor(ratio * 40) + 1
    assert uncertain_negatives(table.slice(0, 0), ratio=0.2).num_rows == 0


@pytest.mark.parametrize("seed", SEEDS)
def test_adopt_round_matches_the_official_gate(seed):
    """trainer.py train_MIL: update_signal = optimal_ac_val >= global_optimal_ac_val (which starts at 0)."""
    rng = np.random.default_rng(seed)
    f1s = np.round(rng.random(30), 1)  # rounding makes equal rounds
    best, official_best = 0.0, 0.0
    for f1 in f1s:
        official = f1 >= official_best
        if official:
            official_best = f1
        adopted = adopt_round(f1, best)
        assert adopted is bool(official)
        if adopted:
            best = f1
    assert adopt_round(0.5, 0.5) and not adopt_round(0.49, 0.5)


# ---------------------------------------------------------------- encoder: plain instance norm, bgr01, official checkpoint

def _torchvision_resnet18_conv_shapes() -> dict[str, tuple[int, ...]]:
    """Key layout of torchvision resnet18(norm_layer=nn.InstanceNorm2d) without fc: convolutions only."""
    shapes = {"conv1.weight": (64, 3, 7, 7)}
    c_in = 64
    for i, width in enumerate((64, 128, 256, 512), start=1):
        for j in range(2):
            first_in = c_in if j == 0 else width
            shapes[f"layer{i}.{j}.conv1.weight"] = (width, first_in, 3, 3)
            shapes[f"layer{i}.{j}.conv2.weight"] = (width, width, 3, 3)
            if j == 0 and i > 1:
                shapes[f"layer{i}.{j}.downsample.0.weight"] = (width, c_in, 1, 1)
        c_in = width
    return shapes


def _official_checkpoint(layout: str, seed: int = 0) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    encoder = {k: torch.randn(s, generator=gen) * 0.05 for k, s in _torchvision_resnet18_conv_shapes().items()}
    head = {"0.weight": torch.randn(512, 512, generator=gen), "0.bias": torch.randn(512, generator=gen),
            "2.weight": torch.randn(256, 512, generator=gen), "2.bias": torch.randn(256, generator=gen)}
    prefix = {"simclr": "module.resnet.", "net": "resnet."}[layout]
    state = {prefix + k: v for k, v in encoder.items()} | {prefix + "fc." + k: v for k, v in head.items()}
    if layout == "simclr":
        return {"state_dict": state, "epoch": 200, "arch": "resnet18"}, encoder, head
    return {"net": state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}}, encoder, head


def test_plain_instance_norm_resnet18_has_the_torchvision_layout():
    plain, affine = resnet18_in(norm="plain"), resnet18_in()
    assert {k: tuple(v.shape) for k, v in plain.state_dict().items()} == _torchvision_resnet18_conv_shapes()
    assert len(affine.state_dict()) > len(plain.state_dict())
    with pytest.raises(ConfigError, match="unknown instance norm"):
        resnet18_in(norm="batch")


def test_bgr01_input_space():
    tiles = _tiles(2, n=3, size=8)
    ours = to_model_input(tiles, "bgr01")
    expected = torch.from_numpy(tiles.numpy()[..., ::-1].copy()).permute(0, 3, 1, 2).double() / 255.0
    assert ours.dtype == torch.float32 and (ours.double() - expected).abs().max().item() <= 1e-7
    assert torch.equal(to_model_input(tiles), to_model_input(tiles, "rgb_imagenet"))
    with pytest.raises(ConfigError, match="unknown input space"):
        to_model_input(tiles, "hsv")


@pytest.mark.parametrize("layout", ["simclr", "net"])
@pytest.mark.parametrize("norm", ["plain", "affine"])
def test_official_simclr_checkpoint_loads(tmp_path, layout, norm):
    checkpoint, encoder, head = _official_checkpoint(layout)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    model = resnet18_in(norm=norm)
    head_state = load_official_simclr(model, path)
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in encoder.items())
    assert head_state.keys() == head.keys() and all(torch.equal(head_state[k], v) for k, v in head.items())
    projection = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 256))
    projection.load_state_dict(head_state)


def test_official_simclr_checkpoint_errors_name_the_keys(tmp_path):
    checkpoint, _, _ = _official_checkpoint("simclr")
    state = checkpoint["state_dict"]
    del state["module.resnet.layer3.1.conv2.weight"]
    state["module.resnet.layer5.0.conv1.weight"] = torch.zeros(1)
    state["module.resnet.layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(checkpoint, path)
    with pytest.raises(ConfigError, match="layer3.1.conv2.weight") as error:
        load_official_simclr(resnet18_in(norm="plain"), path)
    assert "layer5.0.conv1.weight" in str(error.value) and "layer1.0.conv1.weight (64, 64, 1, 1)" in str(error.value)
    with pytest.raises(ValueError, match="no 'resnet.'"):
        official_simclr_state({"state_dict": {"encoder_q.conv1.weight": torch.zeros(1)}})


class _NotWeights:
    """A pickled object: must never be unpickled by the loader."""


def test_official_simclr_loader_never_unpickles_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"module.resnet.conv1.weight": torch.zeros(1)}, "extra": _NotWeights()}, path)
    with pytest.raises(ConfigError, match="not an official"):
        load_official_simclr(resnet18_in(norm="plain"), path)
    with pytest.raises(ConfigError, match="not found"):
        load_official_simclr(resnet18_in(norm="plain"), tmp_path / "missing.pth")
