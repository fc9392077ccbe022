"""The GAN classifier on the fake-score UNet's mid-block (docs/algorithm.md §6)."""

from __future__ import annotations

import torch
from torch import nn


def _norm(channels: int) -> nn.GroupNorm:
    """GroupNorm(32), with fewer groups when a group would hold under 16 channels.

    On the 1x1 map after the stride-4 conv a group normalises only its own channels: 2 per group
    (a 64-channel mid-block) leaves nothing but signs, and the discriminator stays at chance (the
    digits demo's D loss sat at 2 ln 2). Real mid-blocks (768-1280 channels) keep 32 groups.
    """
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0 and (channels // g >= 16 or g == 1))
    return nn.GroupNorm(groups, channels)


class GANHead(nn.Module):
    """Mid-block H x H x C -> one logit per sample.

    Stride-2 4x4 convs with GroupNorm(32) + SiLU halve the map down to 4x4, a 4x4 stride-4 conv
    takes it to 1x1, and a 1x1 conv gives the logit; so the head depends on the training
    resolution (``spatial``). Maps smaller than 4x4 (tiny test models) use a kernel of their size.
    """

    def __init__(self, channels: int, spatial: int):
        super().__init__()
        layers: list[nn.Module] = []
        while spatial > 4:
            layers += [nn.Conv2d(channels, channels, 4, stride=2, padding=1), _norm(channels), nn.SiLU()]
            spatial //= 2
        k = min(spatial, 4)
        layers += [nn.Conv2d(channels, channels, k, stride=4), _norm(channels), nn.SiLU(), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).flatten(1).mean(1).float()
