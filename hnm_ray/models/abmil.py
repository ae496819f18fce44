"""Gated attention MIL aggregator (Ilse, Tomczak & Welling, ICML 2018) with an instance head."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hnm_ray.models.aggregators import MILAggregator, MILOutput, register_aggregator, softmax_pool


@register_aggregator("abmil")
class GatedABMIL(MILAggregator):
    """Gated attention pooling for the bag logit plus a linear instance classifier for tile logits.

    a_i = softmax_i(w^T (tanh(V h_i) * sigmoid(U h_i))), bag logit = Linear(sum_i a_i h_i); the
    instance head Linear(D, 1) gives the per-tile logits used by the max-instance BCE term, the
    ranking loss and hard-negative mining.
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.0) -> None:
        super().__init__(in_dim)
        self.instance_classifier = nn.Linear(in_dim, 1)
        self.dropout = nn.Dropout(dropout)
        self.attention_v = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        self.attention_u = nn.Sequential(nn.Linear(in_dim, hidden), nn.Sigmoid())
        self.attention_w = nn.Linear(hidden, 1)
        self.bag_classifier = nn.Linear(in_dim, 1)

    def bag_output(self, features: torch.Tensor) -> MILOutput:
        """Instance logits, bag logit and the gated attention weights over tiles."""
        instance_logits = self.instance_logits(features)
        hidden = self.dropout(features)
        attention = torch.softmax(self.attention_scores(hidden), dim=0)
        bag_logit = self.bag_classifier(attention @ hidden).squeeze(0)
        return MILOutput(instance_logits, bag_logit, attention)

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) of the linear instance classifier alone (no attention, no bag logit)."""
        self.check_bag(features)
        return self.instance_classifier(features).squeeze(1)

    def attention_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The gated attention's scores (N,) before the softmax over the bag."""
        return self.attention_w(self.attention_v(hidden) * self.attention_u(hidden)).squeeze(1)

    def chunked_output(self, features: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                       chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance logits, bag logit) of `bag_output(prepare(features))`, holding `chunk` tiles' intermediates at a
        time (no grad): the gated attention pooled by `softmax_pool`."""
        instance_logits = []

        def scored(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            tiles = prepare(part)
            self.check_bag(tiles)
            instance_logits.append(self.instance_classifier(tiles).squeeze(1))
            hidden = self.dropout(tiles)
            return self.attention_scores(hidden), hidden

        pooled = softmax_pool(scored(part) for part in features.split(chunk))
        return torch.cat(instance_logits), self.bag_classifier(pooled).squeeze(0)
