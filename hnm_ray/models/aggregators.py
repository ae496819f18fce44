"""MIL aggregators looked up by name: the registry, the shared base class and `build_aggregator`.

Every aggregator maps one bag of tile features (N, D) to per-tile instance logits (N,) and one
bag logit (). The instance logits are what hard-negative mining and the ranking loss use.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
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


def softmax_pool(parts: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """sum_i softmax(s)_i v_i over a bag given in chunks of scores s (n,) and values v (n, D), one chunk at a time (a
    running maximum keeps exp from overflowing, the running sums are rescaled to it): `softmax(s) @ v` of the whole
    bag, to float rounding, holding one chunk."""
    top = total = pooled = None
    for scores, values in parts:
        new_top = scores.max() if top is None else torch.maximum(top, scores.max())
        weights = torch.exp(scores - new_top)
        if top is None:
            total, pooled = weights.sum(), weights @ values
        else:
            rescale = torch.exp(top - new_top)
            total, pooled = total * rescale + weights.sum(), pooled * rescale + weights @ values
        top = new_top
    return pooled / total


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


STD_FLOOR = 1e-6  # the smallest per-feature std features are divided by (a constant feature stays 0)


class Standardized(nn.Module):
    """An aggregator behind per-feature standardisation with training-set statistics (kept as buffers) and, with
    `embed` > 0, a Linear(in_dim, embed) + ReLU instance embedding (`mil.embed`) between the two.

    Scoring without gradients (evaluation, scoring, heatmaps: `torch.no_grad()` in eval mode), a bag of more than
    `eval_chunk` tiles (`mil.eval_chunk_tiles`; 0: never) goes through in chunks of that many tiles when the aggregator
    has `chunked_output` (the built-ins), so the standardised features and the layers' outputs are held for one chunk
    at a time; the logits equal the whole bag's to float rounding. Training always sees the whole bag.

    With `detach_instance_head` (`mil.instance_head detached`) the instance logits are the aggregator's
    `instance_logits` of the embedded tiles detached: the losses on them (max-instance BCE, ranking) train the instance
    head alone, and the embedding learns from the bag branch only (the values are the same; without an embedding there
    is nothing upstream, and it changes nothing)."""

    def __init__(self, aggregator: nn.Module, in_dim: int, embed: int = 0, eval_chunk: int = 0,
                 detach_instance_head: bool = False) -> None:
        super().__init__()
        if detach_instance_head and not hasattr(aggregator, "instance_logits"):
            raise ConfigError("mil.instance_head", f"detached needs an instance_logits(features) method, which "
                                                   f"{type(aggregator).__name__} lacks; subclass "
                                                   "hnm_ray.models.aggregators.MILAggregator, or use shared")
        self.aggregator = aggregator
        self.embed = nn.Sequential(nn.Linear(in_dim, embed), nn.ReLU()) if embed else nn.Identity()
        self.eval_chunk = eval_chunk
        self.detach_instance_head = detach_instance_head
        self.register_buffer("mean", torch.zeros(in_dim))
        self.register_buffer("std", torch.ones(in_dim))

    def set_statistics(self, mean, std) -> None:
        """Use these per-feature mean and standard deviation (std floored to avoid division by ~0)."""
        self.mean.copy_(torch.as_tensor(mean, dtype=self.mean.dtype))
        self.std.copy_(torch.as_tensor(std, dtype=self.std.dtype).clamp_min(STD_FLOOR))

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """What the aggregator sees of tiles (n, in_dim), float16 or float32: standardised (float32), embedded."""
        return self.embed((features.float() - self.mean) / self.std)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.chunked(features) and hasattr(self.aggregator, "chunked_output"):
            return self.aggregator.chunked_output(features, self.prepare, self.eval_chunk)
        prepared = self.prepare(features)
        instance_logits, bag_logit = self.aggregator(prepared)
        if self.detach_instance_head and prepared.requires_grad:
            instance_logits = self.aggregator.instance_logits(prepared.detach())
        return instance_logits, bag_logit

    def instance_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Instance logits (N,) of tiles from any slides: the instance classifier alone, no bag branch."""
        if not hasattr(self.aggregator, "instance_logits"):
            raise ConfigError("mil.aggregator", f"{type(self.aggregator).__name__} has no instance_logits(features) "
                                                "method; subclass hnm_ray.models.aggregators.MILAggregator")
        if self.chunked(features):
            return torch.cat([self.aggregator.instance_logits(self.prepare(part))
                              for part in features.split(self.eval_chunk)])
        return self.aggregator.instance_logits(self.prepare(features))

    def chunked(self, features: torch.Tensor) -> bool:
        """Whether this bag is scored in chunks: more than eval_chunk tiles, eval mode, no gradients."""
        return 0 < self.eval_chunk < features.shape[0] and not self.training and not torch.is_grad_enabled()


def build_standardized(name: str, in_dim: int, embed: int = 0, eval_chunk: int = 0, detach_instance_head: bool = False,
                       **kwargs) -> Standardized:
    """`build_aggregator` (on `embed` features when > 0) wrapped in feature standardisation (statistics set by the
    trainer), the instance embedding (its instance head detached from it with `detach_instance_head`) and chunked
    scoring of bags above `eval_chunk` tiles (0: none)."""
    return Standardized(build_aggregator(name, embed or in_dim, **kwargs), in_dim, embed, eval_chunk,
                        detach_instance_head)
