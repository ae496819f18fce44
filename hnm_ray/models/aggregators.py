"""MIL aggregators looked up by name: the registry, the shared base class and `build_aggregator`.

Every aggregator maps one bag of tile features (N, D) to per-tile instance logits (N,) and one
bag logit (). The instance logits are what hard-negative mining and the ranking loss use.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from hnm_ray.core.errors import ConfigError
from hnm_ray.core.registry import Registry, build_plugin

AggregatorFactory = Callable[..., nn.Module]

_BUILTIN_MODULES = ("hnm_ray.models.dsmil", "hnm_ray.models.dsmil_its2clr", "hnm_ray.models.abmil")


class MILOutput(NamedTuple):
    """Everything one forward pass over a bag produces."""

    instance_logits: torch.Tensor  # (N,)
    bag_logit: torch.Tensor  # ()
    attention: torch.Tensor  # (N,), sums to 1


class MILAggregator(nn.Module):
    """Base class: subclasses implement `bag_output`; `forward` returns (instance_logits, bag_logit)."""

    def __init__(self, in_dim: int) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"in_dim must be >= 1, got {in_dim}")
        self.in_dim = in_dim

    def bag_output(self, features: torch.Tensor) -> MILOutput:
        """Instance logits, bag logit and attention weights for one bag of features (N, D)."""
        raise NotImplementedError

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) for one bag; subclasses override this to skip the bag branch when scoring."""
        return self.bag_output(features).instance_logits

    def check_bag(self, features: torch.Tensor) -> None:
        """Raise ValueError unless `features` is a non-empty (N, in_dim) bag."""
        if features.ndim != 2 or features.shape[0] < 1 or features.shape[1] != self.in_dim:
            raise ValueError(
                f"{type(self).__name__} expects a bag of shape (N >= 1, {self.in_dim}), got {tuple(features.shape)}; "
                "check that the feature store's embedding dim matches the aggregator's in_dim")

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance_logits (N,), bag_logit ()) for one bag of features (N, D)."""
        out = self.bag_output(features)
        return out.instance_logits, out.bag_logit

    def attention(self, features: torch.Tensor) -> torch.Tensor:
        """Attention weights (N,) of the bag classifier over the tiles of one bag."""
        return self.bag_output(features).attention


AGGREGATORS: Registry[AggregatorFactory] = Registry("aggregator")
register_aggregator = AGGREGATORS.register


def available_aggregators() -> list[str]:
    """Names of the registered aggregators (built-ins included)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return AGGREGATORS.names()


def build_aggregator(name: str, in_dim: int, **kwargs) -> nn.Module:
    """Build a registered aggregator ("dsmil", "abmil") or a "module.path:callable" plug-in for in_dim features."""
    if ":" in name:
        model = build_plugin(name, "mil.aggregator", in_dim, **kwargs)
        if not isinstance(model, nn.Module):
            raise ConfigError("mil.aggregator", f"plug-in {name!r} returned {type(model).__name__}, not a "
                                                "torch.nn.Module (subclass hnm_ray.models.aggregators.MILAggregator)")
        return model
    names = available_aggregators()
    if name not in AGGREGATORS:
        raise ConfigError("mil.aggregator", f"unknown aggregator {name!r}; choose one of {names} "
                                            "or a 'module.path:callable' plug-in")
    return AGGREGATORS[name](in_dim, **kwargs)


class Standardized(nn.Module):
    """An aggregator behind per-feature standardisation with training-set statistics (kept as buffers) and, with
    `embed` > 0, a Linear(in_dim, embed) + ReLU instance embedding (`mil.embed`) between the two."""

    def __init__(self, aggregator: nn.Module, in_dim: int, embed: int = 0) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.embed = nn.Sequential(nn.Linear(in_dim, embed), nn.ReLU()) if embed else nn.Identity()
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def set_statistics(self, mean, std) -> None:
        """Use these per-feature mean and standard deviation (std floored to avoid division by ~0)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp_min(1e-6))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.aggregator(self.embed((features - self.mean) / self.std))

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) of tiles from any slides: the instance classifier alone, no bag branch."""
        if not hasattr(self.aggregator, "instance_logits"):
            raise ConfigError("mil.aggregator", f"{type(self.aggregator).__name__} has no instance_logits(features) "
                                                "method; subclass hnm_ray.models.aggregators.MILAggregator")
        return self.aggregator.instance_logits(self.embed((features - self.mean) / self.std))


def build_standardized(name: str, in_dim: int, embed: int = 0, **kwargs) -> Standardized:
    """`build_aggregator` (on `embed` features when > 0) wrapped in feature standardisation (statistics set by the
    trainer) and the instance embedding."""
    return Standardized(build_aggregator(name, embed or in_dim, **kwargs), in_dim, embed)
