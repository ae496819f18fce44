"""The DSMIL variant of the official ItS2CLR / HNM-WSI code (train/models/dsmil.py there), as an aggregator.

It differs from stock DSMIL (`dsmil`): the bag branch first maps the features through Linear(d, d) + ReLU,
the query is one Linear(d, hidden) + Tanh, the value is Dropout + Linear(d, d), and the bag logit is
DSMIL's Conv1d(1, 1, kernel_size=d) over the d-dim bag vector (a Linear(d, 1), same parameters and init).
The critical instance is the one the instance classifier scores highest on the RAW features; its query
is computed from the transformed features like every other query. 592,002 parameters at d = 512.
"""
from __future__ import annotations

import torch
from torch import nn

from hnm_ray.models.aggregators import MILAggregator, MILOutput, register_aggregator


@register_aggregator("dsmil_its2clr")
class DSMILIts2CLR(MILAggregator):
    """Official ItS2CLR/HNM-WSI DSMIL: FCLayer instance classifier + BClassifier with `lin`, q, v and fcc."""

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.0, nonlinear: bool = True) -> None:
        super().__init__(in_dim)
        self.instance_classifier = nn.Linear(in_dim, 1)
        if nonlinear:
            self.transform: nn.Module = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU())
            self.query: nn.Module = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh())
        else:
            self.transform = nn.Identity()
            self.query = nn.Linear(in_dim, hidden)
        self.value = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim))
        self.bag_classifier = nn.Linear(in_dim, 1)
        self.scale = hidden ** -0.5

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) of the linear instance classifier on the raw features (no bag branch)."""
        self.check_bag(features)
        return self.instance_classifier(features).squeeze(1)

    def bag_output(self, features: torch.Tensor) -> MILOutput:
        """Instance logits, bag logit and the attention relative to the critical tile."""
        instance_logits = self.instance_logits(features)
        transformed = self.transform(features)
        queries = self.query(transformed)
        critical = torch.argmax(instance_logits.detach())
        attention = torch.softmax(queries @ queries[critical] * self.scale, dim=0)
        bag_embedding = attention @ self.value(transformed)
        bag_logit = self.bag_classifier(bag_embedding).squeeze(0)
        return MILOutput(instance_logits, bag_logit, attention)
