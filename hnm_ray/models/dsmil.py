"""DSMIL aggregator (Li et al., CVPR 2021), the MIL head of ItS2CLR and HNM-WSI."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hnm_ray.models.aggregators import MILAggregator, MILOutput, register_aggregator, softmax_pool


@register_aggregator("dsmil")
class DSMIL(MILAggregator):
    """Dual-stream MIL: a linear instance classifier plus attention relative to the critical (max-logit) tile.

    Follows DSMIL's `FCLayer` + `BClassifier`: q = Linear-ReLU-Linear-Tanh (or one Linear when
    `nonlinear=False`), A = softmax(q_i . q_crit / sqrt(hidden)), B = sum_i A_i v(h_i), and the bag
    logit is a linear map of B (DSMIL's Conv1d with kernel_size=D is exactly that).
    """

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.0,
                 nonlinear: bool = True, passing_v: bool = False) -> None:
        super().__init__(in_dim)
        self.instance_classifier = nn.Linear(in_dim, 1)
        if nonlinear:
            self.query = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh())
        else:
            self.query = nn.Linear(in_dim, hidden)
        value_layers: list[nn.Module] = [nn.Dropout(dropout)]
        if passing_v:
            value_layers += [nn.Linear(in_dim, in_dim), nn.ReLU()]
        self.value = nn.Sequential(*value_layers)
        self.bag_classifier = nn.Linear(in_dim, 1)
        self.scale = hidden ** -0.5
        self.transform: nn.Module = nn.Identity()  # what the bag branch sees (dsmil_its2clr: Linear + ReLU)

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) of the linear instance classifier alone (no bag branch)."""
        self.check_bag(features)
        return self.instance_classifier(features).squeeze(1)

    def tile_values(self, transformed: torch.Tensor) -> torch.Tensor:
        """What attention weighs per tile: v(h_i) (N, D) of the transformed features."""
        return self.value(transformed)

    def bag_vector(self, pooled: torch.Tensor) -> torch.Tensor:
        """The bag vector B of the attention-weighted sum of tile values (identity here)."""
        return pooled

    def pool(self, attention: torch.Tensor, transformed: torch.Tensor) -> torch.Tensor:
        """The bag vector B = sum_i A_i v(h_i) (D,) of attention weights (N,) over the tiles' transformed features."""
        return self.bag_vector(attention @ self.tile_values(transformed))

    def bag_output(self, features: torch.Tensor) -> MILOutput:
        """Instance logits, bag logit and the attention over tiles relative to the critical tile."""
        instance_logits = self.instance_logits(features)
        transformed = self.transform(features)
        queries = self.query(transformed)
        critical = torch.argmax(instance_logits.detach())
        attention = torch.softmax(queries @ queries[critical] * self.scale, dim=0)
        bag_embedding = self.pool(attention, transformed)
        bag_logit = self.bag_classifier(bag_embedding).squeeze(0)
        return MILOutput(instance_logits, bag_logit, attention)

    def chunked_output(self, features: torch.Tensor, prepare: Callable[[torch.Tensor], torch.Tensor],
                       chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance logits, bag logit) of `bag_output(prepare(features))`, holding `chunk` tiles' intermediates at a
        time (no grad): the instance logits chunk by chunk, the critical tile's query, then the attention-weighted
        values by `softmax_pool`."""
        parts = features.split(chunk)
        instance_logits = torch.cat([self.instance_logits(prepare(part)) for part in parts])
        critical = int(torch.argmax(instance_logits))
        query = self.query(self.transform(prepare(features[critical:critical + 1])))[0]

        def scored(part: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            transformed = self.transform(prepare(part))
            return self.query(transformed) @ query * self.scale, self.tile_values(transformed)

        bag_embedding = self.bag_vector(softmax_pool(scored(part) for part in parts))
        return instance_logits, self.bag_classifier(bag_embedding).squeeze(0)
