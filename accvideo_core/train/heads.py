"""Timestep-aware discriminator heads H_0..H_{m-1} of AccVideo (paper Eq. 7-8).

``D(l, t'_k) = H_k(teacher.image_features(l, t'_k, layer=L_k))``: the frozen teacher extracts image-token
features ``[B, hidden, T', H', W']``; head ``H_k`` is a small 2D convolutional network applied to every latent
frame's token grid ``[hidden, H', W']`` and returns one logit per token position (patch-level, like PatchGAN).

Default head (the paper publishes no depth or width; docs/training.md explains the choices):
1x1 conv hidden -> width, GroupNorm, LeakyReLU(0.2); ``blocks`` residual blocks of two ``kernel`` x ``kernel``
convs with GroupNorm + LeakyReLU (the 3x3 convs see neighbouring tokens, which is what makes it a 2D conv net
rather than a per-token MLP); 1x1 conv width -> 1.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def _groups(width: int, groups: int) -> int:
    return math.gcd(width, max(1, groups))


class ResidualConvBlock(nn.Module):
    def __init__(self, width: int, kernel: int, groups: int) -> None:
        super().__init__()
        pad = kernel // 2
        self.norm1 = nn.GroupNorm(_groups(width, groups), width)
        self.conv1 = nn.Conv2d(width, width, kernel, padding=pad)
        self.norm2 = nn.GroupNorm(_groups(width, groups), width)
        self.conv2 = nn.Conv2d(width, width, kernel, padding=pad)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        return x + self.conv2(self.act(self.norm2(h)))


class DiscriminatorHead(nn.Module):
    """One head ``H_k``: teacher features ``[B, hidden, T', H', W']`` -> logits ``[B, T', H', W']``."""

    def __init__(self, in_channels: int, width: int = 256, blocks: int = 1, kernel: int = 3, groups: int = 32):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"head kernel must be odd (same-size padding), got {kernel}")
        self.proj_in = nn.Conv2d(in_channels, width, 1)
        self.norm_in = nn.GroupNorm(_groups(width, groups), width)
        self.act = nn.LeakyReLU(0.2)
        self.blocks = nn.ModuleList(ResidualConvBlock(width, kernel, groups) for _ in range(blocks))
        self.proj_out = nn.Conv2d(width, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = features.shape
        x = features.transpose(1, 2).reshape(b * t, c, h, w)  # per latent frame
        x = self.act(self.norm_in(self.proj_in(x)))
        for block in self.blocks:
            x = block(x)
        return self.proj_out(x).reshape(b, t, h, w)


def build_heads(segments: int, in_channels: int, *, width: int, blocks: int, kernel: int,
                groups: int) -> nn.ModuleList:
    """``segments`` independent heads (H_k for key timestep t'_k, k = 0..m-1)."""
    return nn.ModuleList(DiscriminatorHead(in_channels, width, blocks, kernel, groups) for _ in range(segments))


def default_feature_layers(num_layers: int, segments: int) -> list[int]:
    """Teacher layer per key timestep k = 0..m-1 (1-based): the paper's 40 of 60 for t'_0 = 0, the last layer
    (60 of 60) for t'_k > 0, mapped proportionally (``round(40 / 60 * N)``, at least 1) for smaller models."""
    clean = max(1, min(num_layers, round(num_layers * 40 / 60)))
    return [clean] + [num_layers] * (segments - 1)
