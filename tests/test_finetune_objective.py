"""finetune.objective, finetune.optimizer and finetune.orientations: our loop's loss on the rows' labels (SupCon, a
fixed-prototype BCE on the projection, or both), its optimiser, and which flips/turns a view may take
(benchmarks/README: on the Camelyon16-regime cohort SupCon collapsed the projection even on true labels, SGD at 0.01
fitted nothing in a round, and rot90 views made a 6 a 9)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from hnm_ray.config import FinetuneConfig
from hnm_ray.training.official_steps import HARD_NEGATIVE, POSITIVE
from hnm_ray.models.cnn import SmallCNN
from hnm_ray.models.encoders import to_model_input
from hnm_ray.training import finetune
from hnm_ray.training.contrastive import contrastive_model, projection_head
from hnm_ray.training.losses import prototype_bce, supcon_loss


def _prototype(dim: int) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(0)), dim=0)


def test_prototype_bce_scores_both_views_against_one_fixed_direction():
    u = _prototype(8)
    z = torch.stack([u, -u, 2 * u, -3 * u])  # cosine +1, -1, +1, -1 whatever the length
    labels = torch.tensor([1, 0, 1, 0])
    assert float(prototype_bce(z, z, labels, 0.1)) < 1e-3
    assert float(prototype_bce(z, z, 1 - labels, 0.1)) > 9.0  # log(1 + e^10)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(torch.tensor([10.0, -10, 10, -10, 0, 0, 0, 0]),
                                                                    torch.tensor([1.0, 0, 1, 0, 1, 0, 1, 0]))
    orthogonal = torch.linalg.qr(torch.stack([u, *torch.eye(8)[:3]], 1))[0][:, 1:].T  # 3 unit vectors _|_ u
    second = torch.cat([orthogonal, orthogonal[:1]])
    assert torch.allclose(prototype_bce(z, second, labels, 0.1), expected, atol=1e-5)
    with pytest.raises(ValueError, match="one label each"):
        prototype_bce(z, z, labels[:3])


def test_the_objective_knob_picks_supcon_bce_or_their_sum():
    z1, z2 = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), torch.randn(6, 8)
    labels = np.array([0, 0, 0, 1, 1, 0])
    y = torch.from_numpy(labels)
    fc = {"temperature": 0.1, "warmup_epochs": 0}
    supcon = supcon_loss(z1, z2, y, 0.1, anchor_mask=y == 0) + supcon_loss(z1, z2, y, 0.1, anchor_mask=y == 1)
    bce = prototype_bce(z1, z2, y, 0.1)
    assert torch.allclose(finetune.our_objective(z1, z2, labels, {**fc, "objective": "supcon"}, 1), supcon)
    assert torch.allclose(finetune.our_objective(z1, z2, labels, {**fc, "objective": "bce"}, 1), bce)
    assert torch.allclose(finetune.our_objective(z1, z2, labels, {**fc, "objective": "supcon_bce"}, 1), supcon + bce)


def test_the_optimiser_knob_and_its_learning_rate_defaults():
    assert (FinetuneConfig().optimizer, FinetuneConfig().step_lr()) == ("adam", 1e-3)
    assert FinetuneConfig(optimizer="sgd").step_lr() == 0.01  # the official
    assert FinetuneConfig(optimizer="adam", lr=0.05).step_lr() == 0.05
    params = [torch.nn.Parameter(torch.zeros(2))]
    fc = {"lr": 0.002, "momentum": 0.5, "weight_decay": 0.0}
    assert isinstance(finetune.optimizer_for(params, {**fc, "optimizer": "adam"}), torch.optim.Adam)
    sgd = finetune.optimizer_for(params, {**fc, "optimizer": "sgd"})
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.5
    assert sgd.param_groups[0]["lr"] == 0.002


def _mark_tiles(n: int, corner_of_tumour: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16 px tiles of noise with one bright 5 px mark: top-left on tumour tiles, bottom-right on the rest (a class
    that orientation alone tells apart, as a 9 from a 6)."""
    rng = np.random.default_rng(seed)
    tiles = rng.integers(60, 120, (n, 16, 16, 3), dtype=np.uint8)
    labels = (np.arange(n) % 2).astype(np.int64)
    for i, y in enumerate(labels):
        rows = slice(1, 6) if y == int(corner_of_tumour == "top_left") else slice(10, 15)
        tiles[i, rows, rows] = 250
    return tiles, labels


def _train(objective: str, orientations: str, steps: int = 30) -> tuple[float, float]:
    """Our loop's loss (product views, objective and optimiser) on mark tiles; returns the mean loss of the last 10
    steps and the test AUC of the projection's prototype score."""
    torch.manual_seed(0)
    encoder = SmallCNN((8, 16))
    model = contrastive_model(encoder, projection_head(encoder.out_dim, 16))
    fc = {**FinetuneConfig(objective=objective, optimizer="adam", orientations=orientations).__dict__,
          "lr": 3e-3, "warmup_epochs": 0}
    optimizer = finetune.optimizer_for(model.parameters(), fc)
    tiles, labels = _mark_tiles(64, "top_left", seed=0)
    gen, losses = torch.Generator().manual_seed(0), []
    for step in range(steps):
        pick = np.random.default_rng(step).choice(len(tiles), 32, replace=False)
        batch = {"tiles": tiles[pick], "label": labels[pick], "kind": np.where(labels[pick], POSITIVE, HARD_NEGATIVE),
                 "pos_rank": np.zeros(32), "supcon_class": labels[pick], "error": np.full(32, "", dtype=object)}
        loss = finetune.our_loss(batch, model, fc, 1, 1.0, gen, "cpu", True, "rgb_imagenet")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    test, truth = _mark_tiles(64, "top_left", seed=1)
    with torch.no_grad():
        z = torch.nn.functional.normalize(model.eval()(to_model_input(torch.from_numpy(test))), dim=1)
    return float(np.mean(losses[-10:])), float(roc_auc_score(truth, (z @ _prototype(16)).numpy()))


def test_bce_learns_a_class_that_orientation_tells_apart_only_with_views_that_keep_it():
    """The joint of the three knobs: with views as the tiles lie, the BCE objective (Adam) fits the labels and separates
    unseen tiles; with the dihedral views (a turned top-left mark is a bottom-right one: both classes give the same
    views) the same training stays at chance, log 2."""
    loss, auc = _train("bce", "none")
    assert loss < 0.3 and auc > 0.95
    loss, _ = _train("bce", "dihedral")
    assert loss > 0.6
