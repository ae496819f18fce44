"""The built-in CNN tile encoders (registered by name in `encoders`): `ResNetIN`, a ResNet with instance norm (the
paper's f as `resnet18_in`, parameter names as in torchvision), and `SmallCNN` (`small_cnn`, the CPU demo encoder)."""
from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int, affine: bool = True) -> nn.Module:
    return nn.InstanceNorm2d(channels, affine=affine)


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 convs + identity/projection shortcut) with instance norm."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = _norm(channels, affine)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = _norm(channels, affine)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                            _norm(channels, affine))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


def _stage(in_channels: int, channels: int, n_blocks: int, stride: int, affine: bool = True) -> nn.Sequential:
    """One ResNet stage: the first block changes width/stride, the others keep them."""
    return nn.Sequential(BasicBlock(in_channels, channels, stride, affine),
                         *(BasicBlock(channels, channels, affine=affine) for _ in range(n_blocks - 1)))


class ResNetIN(nn.Module):
    """ResNet with instance norm and no classifier: (B, 3, H, W) -> (B, out_dim) after global average pooling."""

    def __init__(self, blocks: tuple[int, int, int, int] = (2, 2, 2, 2),
                 widths: tuple[int, int, int, int] = (64, 128, 256, 512), affine: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = _norm(widths[0], affine)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages = [_stage(c_in, c_out, n, 1 if i == 0 else 2, affine)
                  for i, (c_in, c_out, n) in enumerate(zip((widths[0], *widths[:-1]), widths, blocks))]
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


SMALL_CNN_WIDTHS = (16, 32, 64, 128)  # channels of small_cnn's four stride-2 blocks; the last is its feature size


class SmallCNN(nn.Module):
    """A small fast CNN for CPU demos: stride-2 3x3 conv + instance norm + ReLU blocks, global average pool.

    The last block has no instance norm: normalising each channel over the tile right before the global
    average pool would leave the pooled feature a function of the channel's distribution shape only, nearly
    the same for every tile (features "from noise" at init, and SimCLR collapsing to chance loss).
    """

    def __init__(self, widths: tuple[int, ...] = SMALL_CNN_WIDTHS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for i, width in enumerate(widths):
            last = i == len(widths) - 1
            norm = [] if last else [_norm(width)]
            layers += [nn.Conv2d(in_channels, width, 3, 2, 1, bias=last), *norm, nn.ReLU(inplace=True)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)
