"""Tile augmentations for contrastive fine-tuning, in plain torch on whole batches (any device).

Two independently augmented views per tile (SimCLR/SupCon): random resized crop, flips and
90-degree rotations (histology has no canonical orientation), and colour jitter on brightness,
contrast and saturation (stain variation). Written in torch so no torchvision build is needed.
`augment_official` is the official ItS2CLR/HNM-WSI SimCLR set, built from kornia modules.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    brightness: float = 0.6  # +-60 %: stain and brightness must not tell tiles apart (0.3 did: benchmarks/README)
    contrast: float = 0.6
    saturation: float = 0.6
    out_size: int | None = None
    orientations: str = "dihedral"  # ORIENTATIONS: which flips/rotations a view may take


# Which orientations a view may take: the 8 of the square (flips and 90-degree turns: no orientation of tissue is
# another tissue), a horizontal flip (the official SimCLR set's), or the tile as it lies (classes whose orientation
# tells them apart: a 6 turned twice is a 9).
ORIENTATIONS = ("dihedral", "hflip", "none")


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


def _flip_rotate(x: torch.Tensor, gen: torch.Generator, orientations: str = "dihedral") -> torch.Tensor:
    """Random horizontal flip and (dihedral) rotation by a multiple of 90 degrees, per square image (a new tensor);
    "hflip": the flip alone; "none": the images as they are."""
    if orientations not in ORIENTATIONS:
        raise ValueError(f"unknown orientations {orientations!r}; choose one of {list(ORIENTATIONS)}")
    if orientations == "none":
        return x.clone()
    flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(x.device)
    x = x.clone()
    x[flip] = x[flip].flip(-1)
    if orientations == "hflip":
        return x
    turns = torch.randint(0, 4, (x.shape[0],), generator=gen).to(x.device)
    for k in (1, 2, 3):  # the images of each turn count at once: ~3x faster than a rot90 per image
        turned = turns == k
        x[turned] = torch.rot90(x[turned], k, dims=(-2, -1))
    return x


def _colour_jitter(x: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """Per-image brightness, contrast and saturation jitter on [0, 1] images."""
    b = x.shape[0]

    def factor(strength: float) -> torch.Tensor:
        return torch.empty(b).uniform_(1 - strength, 1 + strength, generator=gen).to(x.device, x.dtype)[:, None, None, None]

    x = x * factor(cfg.brightness)  # then in place: the same arithmetic, a third of the memory traffic
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x.sub_(mean).mul_(factor(cfg.contrast)).add_(mean)
    grey = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
    x.sub_(grey).mul_(factor(cfg.saturation)).add_(grey)
    return x.clamp_(0, 1)


def augment(tiles: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One augmented view of uint8 (B,H,W,3) tiles -> uint8 (B,S,S,3) (S = cfg.out_size or H)."""
    if tiles.dtype != torch.uint8:  # float tiles would be scaled in place below (.float() returns them as they are)
        raise ValueError(f"augment takes uint8 tiles (B, H, W, 3), got {tiles.dtype}")
    x = tiles.permute(0, 3, 1, 2).float().div_(255.0)
    out = cfg.out_size or tiles.shape[1]
    x = _random_resized_crop(x, cfg.crop_scale, out, gen)
    x = _flip_rotate(x, gen, cfg.orientations)
    x = _colour_jitter(x, cfg, gen)
    return x.mul_(255.0).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


# The official ItS2CLR/HNM-WSI set (dataset/dataloader_simCLR.py `_get_simclr_pipeline_transform`).
OFFICIAL_CROP_SCALE = (0.08, 1.0)
OFFICIAL_JITTER = (0.8, 0.8, 0.8, 0.2)  # brightness, contrast, saturation, hue
OFFICIAL_JITTER_P = 0.8
OFFICIAL_GRAYSCALE_P = 0.2
OFFICIAL_BLUR_KERNEL = 13  # int(0.06 * 224)
OFFICIAL_BLUR_SIGMA = (0.1, 2.0)
OFFICIAL_BLUR_P = 0.5


def official_pipeline(out: int) -> torch.nn.Sequential:
    """The official SimCLR augmentations as kornia modules on float (B, 3, H, W) images in [0, 1]."""
    import kornia.augmentation as K

    return torch.nn.Sequential(
        K.RandomResizedCrop((out, out), scale=OFFICIAL_CROP_SCALE),
        K.RandomHorizontalFlip(p=0.5),
        K.ColorJitter(*OFFICIAL_JITTER, p=OFFICIAL_JITTER_P),
        K.RandomGrayscale(p=OFFICIAL_GRAYSCALE_P),
        K.RandomGaussianBlur((OFFICIAL_BLUR_KERNEL, OFFICIAL_BLUR_KERNEL), OFFICIAL_BLUR_SIGMA, p=OFFICIAL_BLUR_P),
    )


def augment_official(tiles: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator) -> torch.Tensor:
    """One view with the official augmentations: uint8 RGB (B,H,W,3) -> uint8 RGB (B,S,S,3) (S = cfg.out_size or H).

    Only cfg.out_size is used. The colour steps run on BGR, as in the official code (cv2.imread tiles fed
    to RGB-assuming transforms), which changes grayscale, contrast and saturation. kornia draws its random
    parameters from the global generators: they are forked and seeded from `gen`, so `gen` alone decides
    the views and the caller's global RNG state is left as it was.
    """
    out = cfg.out_size or tiles.shape[1]
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    with torch.random.fork_rng(devices=[tiles.device] if tiles.is_cuda else []):  # on a GPU its generator too
        torch.default_generator.manual_seed(seed)
        if tiles.is_cuda:
            with torch.cuda.device(tiles.device):
                torch.cuda.manual_seed(seed)
        x = official_pipeline(out)(tiles.flip(-1).permute(0, 3, 1, 2).float() / 255.0)
    return (x.clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).flip(-1).contiguous()


AUGMENTATIONS = {"ours": augment, "official": augment_official}


def two_views(tiles: torch.Tensor, cfg: AugmentConfig, gen: torch.Generator,
              augmentation: str = "ours") -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent augmented views of the same tiles (uint8, same layout): "ours" or "official" augmentations."""
    if augmentation not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose one of {sorted(AUGMENTATIONS)}")
    view = AUGMENTATIONS[augmentation]
    return view(tiles, cfg, gen), view(tiles, cfg, gen)
