"""Several trained aggregators as one model (`mil.ensemble`): their instance and bag logits averaged.

One aggregator draw on a few hundred slides is noisy (a different seed moves test AUC by ~0.03,
benchmarks/README "How much of that is one MIL draw"); the mean of a few draws' logits is a better classifier
and a steadier one round to round. Members are `Standardized` aggregators of the same architecture; the ensemble
is saved as one safetensors file (keys `members.{i}.…`) + JSON (`members`: their count), like a single model.
"""
from __future__ import annotations

import torch
from torch import nn


class AggregatorEnsemble(nn.Module):
    """The mean of its members' (instance logits, bag logit); `instance_logits` the mean of theirs."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an aggregator ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = [member(features) for member in self.members]
        return (torch.stack([inst for inst, _ in outputs]).mean(0),
                torch.stack([bag for _, bag in outputs]).mean(0))

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) of tiles from any slides: the mean of the members' instance branches."""
        return torch.stack([member.instance_logits(features) for member in self.members]).mean(0)
