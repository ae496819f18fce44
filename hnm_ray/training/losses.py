"""Losses of the method: bag/max-instance BCE, the multiple-instance ranking loss and SupCon."""
from __future__ import annotations

import functools

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _check_scores(scores: torch.Tensor, name: str) -> None:
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor of instance logits, got shape {tuple(scores.shape)}")


def topk_mean(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mean of the k largest entries of a 1-D score tensor (k clipped to its length)."""
    _check_scores(scores, "scores")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return torch.topk(scores, min(k, scores.numel())).values.mean()


def ranking_loss(s_pos: torch.Tensor, s_neg: torch.Tensor, margin: float = 1.0, k: int = 10) -> torch.Tensor:
    """Multiple instance ranking loss relu(margin + topk_mean(s_neg) - topk_mean(s_pos)) on raw instance logits."""
    return F.relu(margin + topk_mean(s_neg, k) - topk_mean(s_pos, k))


def global_ranking_loss(s_pos_bags: Sequence[torch.Tensor] | torch.Tensor, s_hard_neg: torch.Tensor,
                        margin: float = 1.0, k: int = 10) -> torch.Tensor:
    """Ranking loss of every positive bag against the pooled hard negatives' top-k mean, averaged over bags.

    `s_pos_bags` is a list of 1-D logit tensors (one per positive bag), one 1-D tensor (one bag)
    or a 2-D tensor whose rows are equal-sized bags.
    """
    if isinstance(s_pos_bags, torch.Tensor):
        s_pos_bags = [s_pos_bags] if s_pos_bags.ndim == 1 else list(s_pos_bags)
    if len(s_pos_bags) == 0:
        raise ValueError("global_ranking_loss needs at least one positive bag")
    negative = topk_mean(s_hard_neg, k)
    positives = torch.stack([topk_mean(s, k) for s in s_pos_bags])
    return F.relu(margin + negative - positives).mean()


def bag_bce(bag_logit: torch.Tensor, inst_logits: torch.Tensor, label: float | int | torch.Tensor,
            pos_weight: float | torch.Tensor | None = None, w_bag: float = 0.5, w_ins: float = 0.5) -> torch.Tensor:
    """w_bag * BCE(bag_logit, y) + w_ins * BCE(max_i inst_logit_i, y), BCE with logits and positive class weight."""
    _check_scores(inst_logits, "inst_logits")
    return bags_bce(bag_logit.reshape(()), inst_logits.max(), label, pos_weight, w_bag, w_ins)


def bags_bce(bag_logits: torch.Tensor, max_inst_logits: torch.Tensor, labels: float | int | torch.Tensor | np.ndarray,
             pos_weight: float | torch.Tensor | None = None, w_bag: float = 0.5, w_ins: float = 0.5) -> torch.Tensor:
    """`bag_bce` of bags given by their bag logits and max instance logits (same shape), one value per bag."""
    target = torch.as_tensor(labels, dtype=bag_logits.dtype, device=bag_logits.device).reshape(bag_logits.shape)
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=bag_logits.dtype,
                                                              device=bag_logits.device).reshape(())
    bag_term = F.binary_cross_entropy_with_logits(bag_logits, target, pos_weight=weight, reduction="none")
    max_term = F.binary_cross_entropy_with_logits(max_inst_logits, target, pos_weight=weight, reduction="none")
    return w_bag * bag_term + w_ins * max_term


def pair_loss(pos: tuple[torch.Tensor, torch.Tensor], neg: tuple[torch.Tensor, torch.Tensor],
              pos_weight: float | torch.Tensor | None = None, w_bag: float = 0.5, w_ins: float = 0.5,
              w_rank: float = 0.1, margin: float = 1.0, k: int = 10, bce_scale: float = 1.0) -> torch.Tensor:
    """Loss of one (positive, negative) bag pair, each given as (instance_logits, bag_logit).

    Mean of the two bags' BCE terms (times `bce_scale`) plus w_rank * ranking_loss, as in the official HNM-WSI code
    (utils.py epoch_train), where `BCEWithLogitsLoss(ratio)` puts the class ratio in `weight`: it scales the BCE
    terms only, never the ranking term.
    """
    (pos_inst, pos_bag), (neg_inst, neg_bag) = pos, neg
    bce = 0.5 * bce_scale * (bag_bce(pos_bag, pos_inst, 1.0, pos_weight, w_bag, w_ins)
                             + bag_bce(neg_bag, neg_inst, 0.0, pos_weight, w_bag, w_ins))
    if w_rank == 0:
        return bce
    return bce + w_rank * ranking_loss(pos_inst, neg_inst, margin=margin, k=k)


def class_pos_weight(labels: Sequence[int] | np.ndarray) -> float:
    """Positive class weight #negative bags / #positive bags for BCE-with-logits."""
    values = np.asarray(labels).reshape(-1)
    n_pos = int(np.sum(values == 1))
    n_neg = int(np.sum(values == 0))
    if n_pos == 0 or n_neg == 0 or n_pos + n_neg != values.size:
        raise ValueError(f"class_pos_weight needs 0/1 labels with both classes present; got {n_pos} positive, "
                         f"{n_neg} negative and {values.size - n_pos - n_neg} other labels")
    return n_neg / n_pos


def supcon_loss(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor | None = None,
                temperature: float = 0.07, anchor_mask: torch.Tensor | None = None,
                base_temperature: float = 0.07) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020) over two views z1, z2 (B, d); labels None -> SimCLR NT-Xent.

    Features are L2-normalised here. Every view is contrasted with the other 2B - 1 views; its positives
    are the views with the same label (or its own other view when labels is None). `anchor_mask` (B,) bool
    restricts which samples (both views) act as anchors, e.g. the hard negatives ("negatives as anchors")
    or the selected positives ("positives as anchors"); the loss is averaged over those anchors and is a
    zero that still carries gradients when there are none. Scaled by temperature / base_temperature as
    in the reference implementation.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"z1 and z2 must both be (B, d) with B >= 1, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch = z1.shape[0]
    device = z1.device
    features = F.normalize(torch.cat([z1, z2]), dim=1)
    ids = torch.arange(batch, device=device) if labels is None else labels.to(device).reshape(-1)
    if ids.numel() != batch:
        raise ValueError(f"labels must have one entry per sample ({batch}), got {ids.numel()}")
    ids = ids.repeat(2)
    is_self = torch.eye(2 * batch, dtype=torch.bool, device=device)
    logits = (features @ features.T / temperature).masked_fill(is_self, float("-inf"))
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(is_self, 0.0)
    positives = (ids[:, None] == ids[None, :]) & ~is_self
    per_anchor = -(log_prob * positives).sum(dim=1) / positives.sum(dim=1)
    anchors = (torch.ones(batch, dtype=torch.bool, device=device) if anchor_mask is None
               else anchor_mask.to(device=device, dtype=torch.bool).reshape(-1))
    if anchors.numel() != batch:
        raise ValueError(f"anchor_mask must have one entry per sample ({batch}), got {anchors.numel()}")
    anchors = anchors.repeat(2)
    if not bool(anchors.any()):
        return per_anchor.sum() * 0.0
    return (temperature / base_temperature) * per_anchor[anchors].mean()


@functools.lru_cache(maxsize=8)
def _prototype(dim: int, seed: int) -> torch.Tensor:
    """The fixed unit vector of `prototype_bce`: drawn once per (dim, seed), not on every batch."""
    return F.normalize(torch.randn(dim, generator=torch.Generator().manual_seed(seed)), dim=0)


def prototype_bce(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                  seed: int = 0) -> torch.Tensor:
    """Binary cross-entropy of 0/1 `labels` on two views' projections z1, z2 (B, d), each scored cos(z, u) / temperature
    against one fixed unit vector u (drawn from `seed`: the same on every rank, round and resume).

    A cosine classifier with a fixed prototype (Hoffer et al. 2018, "Fix your classifier"): the trainable projection
    head turns the tumour direction towards u, so the loss adds no weight to the model or its files."""
    if z1.ndim != 2 or z1.shape != z2.shape or labels.numel() != z1.shape[0]:
        raise ValueError(f"z1, z2 must be (B, d) with one label each, got {tuple(z1.shape)}, {tuple(z2.shape)} and "
                         f"{labels.numel()} labels")
    prototype = _prototype(z1.shape[1], seed).to(z1.device, z1.dtype)
    logits = F.normalize(torch.cat([z1, z2]), dim=1) @ prototype / temperature
    return F.binary_cross_entropy_with_logits(logits, labels.to(z1.device, z1.dtype).reshape(-1).repeat(2))


def supcon_official(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, anchor_mask: torch.Tensor,
                    contrast_mask: torch.Tensor | None = None, temperature: float = 0.07,
                    base_temperature: float = 0.07) -> torch.Tensor:
    """SupCon as the official ItS2CLR/HNM-WSI fine-tuning computes it (loss/losses.py `SupConLoss`, pair_mode 1/2).

    z1, z2 (N, d) are two views (L2-normalised here); labels (N,) pseudo labels; anchor_mask (N,) bool the
    anchor samples; contrast_mask (N,) bool the samples every view may be contrasted with (None: all).
    View i's denominator sums exp(sim / T) over the other views j with contrast_mask; its positives are the
    views j != i with the same label that are anchors and in the contrast set; its loss is
    -(T / base_T) * mean log-probability of its positives, 0 when it is no anchor or has no positive.
    The result is the mean over ALL 2N views, anchors or not.

    Differences from `supcon_loss`: that one averages over the anchor views only (so a step with few
    anchors, e.g. 25 positives among 511 tiles, weighs ~20x more), lets a non-anchor same-label view be
    a positive and has no contrast mask. Step A (`supcon_step_a`) and step B (`supcon_step_b`) set the masks.
    """
    if z1.ndim != 2 or z1.shape != z2.shape or z1.shape[0] < 1:
        raise ValueError(f"z1 and z2 must both be (B, d) with B >= 1, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    batch, device = z1.shape[0], z1.device
    contrast = torch.ones(batch, dtype=torch.bool, device=device) if contrast_mask is None else contrast_mask
    masks = [m.to(device).reshape(-1) for m in (labels, anchor_mask, contrast)]
    if any(m.numel() != batch for m in masks):
        raise ValueError(f"labels, anchor_mask and contrast_mask need one entry per sample ({batch}), "
                         f"got {[m.numel() for m in masks]}")
    ids, anchors, contrast = masks[0].repeat(2), masks[1].bool().repeat(2), masks[2].bool().repeat(2)
    features = F.normalize(torch.cat([z1, z2]), dim=1)
    others = contrast[None, :] & ~torch.eye(2 * batch, dtype=torch.bool, device=device)
    positives = others & (ids[:, None] == ids[None, :]) & anchors[:, None] & anchors[None, :]
    logits = (features @ features.T / temperature).masked_fill(~others, float("-inf"))
    # Rows without a positive contribute 0; zeroing them keeps their log-sum-exp (and gradients) finite.
    logits = logits.masked_fill(~positives.any(dim=1, keepdim=True), 0.0)
    log_prob = (logits - torch.logsumexp(logits, dim=1, keepdim=True)).masked_fill(~positives, 0.0)
    per_view = -(temperature / base_temperature) * log_prob.sum(dim=1) / positives.sum(dim=1).clamp(min=1)
    return per_view.mean()


def supcon_step_a(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, bag_labels: torch.Tensor,
                  temperature: float = 0.07, base_temperature: float = 0.07,
                  mask_uncertain_neg: bool = True) -> torch.Tensor:
    """Official step A: negatives (label 0) anchor; uncertain negatives (label 0, positive slide) are not contrasted."""
    anchors = labels == 0
    contrast = ~(anchors & (bag_labels == 1)) if mask_uncertain_neg else None
    return supcon_official(z1, z2, labels, anchors, contrast, temperature, base_temperature)


def supcon_step_b(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, temperature: float = 0.07,
                  base_temperature: float = 0.07) -> torch.Tensor:
    """Official step B: positives (label 1) are the anchors, contrasted with every view of the batch."""
    return supcon_official(z1, z2, labels, labels == 1, None, temperature, base_temperature)
