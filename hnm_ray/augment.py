"""Tile augmentations for contrastive fine-tuning, in plain torch on whole batches (any device).

Two independently augmented views per tile (SimCLR/SupCon): random resized crop, flips and
90-degree rotations (histology has no canonical orientation), and colour jitter on brightness,
contrast and saturation (stain variation). Written in torch so no torchvision build is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    out_size: int | None = None


def _random_resized_crop(x: torch.Tensor, scale: tuple[float, float], out: int, gen: torch.Generator) -> torch.Tensor:
    """One random square crop per image (area fraction in `scale`), resized to out x out."""
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=gen)
    side = (area.sqrt() * min(h, w)).clamp(min=8).round()
    ox = (torch.rand(b, generator=gen) * (w - side + 1)).floor()
    oy = (torch.rand(b, generator=gen) * (h - side + 1)).floor()
    # An affine grid per image: cheaper than a Python loop of crops + resizes.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = side / w
    theta[:, 1, 1] = side / h
    theta[:, 0, 2] = (2 * ox + side) / w - 1
    theta[:, 1, 2] = (2 * oy + side) / h - 1
    grid = F.affine_grid(theta.to(x.device, x.dtype), [b, 3, out, out], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _flip_rotate(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and rotation by a multiple of 90 degrees, per image."""
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    turns = torch.randint(0, 4, (x.shape[0],), generator=gen)
    return torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(x, turns)])


def _colour_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation jitter on [0, 1] images."""
    b = x.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return torch.empty(b).uniform_(1 - strength, 1 + strength, generator=gen).to(x.device, x.dtype)[:, None, None, None]

    x = x * factor(cfg.brightness)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor(cfg.contrast) + mean
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x = (x - grey) * factor(cfg.saturation) + grey
    return x.clamp(0, 1)


def augment(tiles: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of uint8 (B,H,W,3) tiles -> uint8 (B,S,S,3) (S = cfg.out_size or H)."""
    x = tiles.permute(0, 3, 1, 2).float() / 255.0
    out = cfg.out_size or tiles.shape[1]
    x = _random_resized_crop(x, cfg.crop_scale, out, gen)
    x = _flip_rotate(x, gen)
    x = _colour_jitter(x, cfg, gen)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def two_views(tiles: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmented views of the same tiles (uint8, same layout as the input)."""
    return augment(tiles, cfg, gen), augment(tiles, cfg, gen)
