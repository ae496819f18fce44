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

from hnm_ray.models.aggregators import MILAggregator, register_aggregator
from hnm_ray.models.dsmil import DSMIL


@register_aggregator("dsmil_its2clr")
class DSMILIts2CLR(DSMIL):
    """Official ItS2CLR/HNM-WSI DSMIL: FCLayer instance classifier + BClassifier with `lin`, q, v and fcc."""

    def __init__(self, in_dim: int, hidden: int = 128, dropout: float = 0.0, nonlinear: bool = True) -> None:
        MILAggregator.__init__(self, in_dim)  # its own layers; DSMIL's instance_logits and bag_output run them
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

    def tile_values(self, transformed: torch.Tensor) -> torch.Tensor:
        """drop(h_i): the value layer's Linear is applied once per bag (`bag_vector`)."""
        return self.value[0](transformed)

    def bag_vector(self, pooled: torch.Tensor) -> torch.Tensor:
        """B = sum_i A_i (W drop(h_i) + b) = W (sum_i A_i drop(h_i)) + b, the softmax weights summing to 1: the
        official value layer's bag vector (equal to float rounding, same dropout draws) with one d x d product per
        bag instead of one per tile (the per-tile product was ~1/2 of this aggregator's training step)."""
        return self.value[1](pooled)
