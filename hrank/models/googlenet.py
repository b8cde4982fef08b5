"""GoogLeNet for CIFAR (the kuangliu/HRank variant): 192-channel stem, nine inception modules, biased convs."""

from __future__ import annotations

import torch
from torch import nn

from hrank.models.base import RankPoint

# in_planes, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes
INCEPTION_CFG = {
    "a3": (192, 64, 96, 128, 16, 32, 32),
    "b3": (256, 128, 128, 192, 32, 96, 64),
    "a4": (480, 192, 96, 208, 16, 48, 64),
    "b4": (512, 160, 112, 224, 24, 64, 64),
    "c4": (512, 128, 128, 256, 24, 64, 64),
    "d4": (512, 112, 144, 288, 32, 64, 64),
    "e4": (528, 256, 160, 320, 32, 128, 128),
    "a5": (832, 256, 160, 320, 32, 128, 128),
    "b5": (832, 384, 192, 384, 48, 128, 128),
}
ORDER = ["a3", "b3", "a4", "b4", "c4", "d4", "e4", "a5", "b5"]
# Inceptions whose rank is measured after the max-pool that follows them (HRank).
POOLED_AFTER = {"b3": "maxpool1", "e4": "maxpool2"}


def _cbr(in_ch: int, out_ch: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel_size=k, padding=k // 2), nn.BatchNorm2d(out_ch), nn.ReLU(True)]


class Inception(nn.Module):
    """Four branches concatenated: 1x1; 1x1-3x3; 1x1-3x3-3x3 (the "5x5"); maxpool-1x1."""

    def __init__(self, in_planes, n1x1, n3x3red, n3x3, n5x5red, n5x5, pool_planes) -> None:
        super().__init__()
        self.branch1x1 = nn.Sequential(*_cbr(in_planes, n1x1, 1))
        self.branch3x3 = nn.Sequential(*_cbr(in_planes, n3x3red, 1), *_cbr(n3x3red, n3x3, 3))
        self.branch5x5 = nn.Sequential(*_cbr(in_planes, n5x5red, 1), *_cbr(n5x5red, n5x5, 3), *_cbr(n5x5, n5x5, 3))
        self.branch_pool = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), *_cbr(in_planes, pool_planes, 1))

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch3x3(x), self.branch5x5(x), self.branch_pool(x)], 1)


class GoogLeNetCifar(nn.Module):
    """pre_layers, a3, b3, maxpool, a4..e4, maxpool, a5, b5, AvgPool 8, Linear 1024->classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.pre_layers = nn.Sequential(*_cbr(3, 192, 3))
        for name in ORDER:
            setattr(self, f"inception_{name}", Inception(*INCEPTION_CFG[name]))
        self.maxpool1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.maxpool2 = nn.MaxPool2d(3, stride=2, padding=1)
        self.avgpool = nn.AvgPool2d(8, stride=1)
        self.linear = nn.Linear(1024, num_classes)

    def forward(self, x):
        x = self.pre_layers(x)
        x = self.inception_b3(self.inception_a3(x))
        x = self.maxpool1(x)
        for name in ("a4", "b4", "c4", "d4", "e4"):
            x = getattr(self, f"inception_{name}")(x)
        x = self.maxpool2(x)
        x = self.inception_b5(self.inception_a5(x))
        return self.linear(self.avgpool(x).flatten(1))


def _branch_convs(model: nn.Module, name: str) -> list[tuple[str, ...]]:
    """Per inception, the pruned convs by branch: 1x1, the 3x3 output, both 5x5-branch convs, pool proj."""
    m = f"inception_{name}"
    return [(f"{m}.branch1x1.0",), (f"{m}.branch3x3.3",), (f"{m}.branch5x5.3", f"{m}.branch5x5.6"),
            (f"{m}.branch_pool.1",)]


def rate_entries(model: nn.Module) -> list[tuple[str, ...]]:
    """Entry 0: pre_layers; entries 1..9: all pruned convs of a3, b3, a4, b4, c4, d4, e4, a5, b5."""
    entries: list[tuple[str, ...]] = [("pre_layers.0",)]
    for name in ORDER:
        entries.append(tuple(c for group in _branch_convs(model, name) for c in group))
    return entries


def rank_points(model: nn.Module) -> dict[str, RankPoint]:
    """The inception output sliced per branch (after the following max-pool for b3 and e4).

    Both convs of the "5x5" branch are scored on the branch's output, as HRank does (one rank file).
    """
    points = {"pre_layers.0": RankPoint("pre_layers")}
    for name in ORDER:
        _, n1, _, n3, _, n5, npool = INCEPTION_CFG[name]
        module = POOLED_AFTER.get(name, f"inception_{name}")
        bounds = [0, n1, n1 + n3, n1 + n3 + n5, n1 + n3 + n5 + npool]
        for (lo, hi), convs in zip(zip(bounds[:-1], bounds[1:], strict=True), _branch_convs(model, name),
                                   strict=True):
            for conv in convs:
                points[conv] = RankPoint(module, (lo, hi))
    return points
