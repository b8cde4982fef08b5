"""DenseNet-40 for CIFAR (growth 12, no compression), laid out as HRank's densenet_40."""

from __future__ import annotations

import torch
from torch import nn

from hrank.models.base import RankPoint


class DenseLayer(nn.Module):
    """BN-ReLU-conv3x3, output concatenated to the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x):
        return torch.cat((x, self.conv1(self.relu(self.bn1(x)))), 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1-AvgPool2d(2)."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)
        self.avgpool = nn.AvgPool2d(2)

    def forward(self, x):
        return self.avgpool(self.conv1(self.relu(self.bn1(x))))


class DenseNetCifar(nn.Module):
    """Stem conv 3->24, three dense blocks of ``n`` layers joined by transitions, BN-ReLU-AvgPool-FC."""

    def __init__(self, depth: int = 40, growth: int = 12, num_classes: int = 10) -> None:
        super().__init__()
        n = (depth - 4) // 3
        self.growth = growth
        planes = 2 * growth
        self.conv1 = nn.Conv2d(3, planes, kernel_size=3, padding=1, bias=False)
        for b in (1, 2, 3):
            layers = []
            for _ in range(n):
                layers.append(DenseLayer(planes, growth))
                planes += growth
            setattr(self, f"dense{b}", nn.Sequential(*layers))
            if b < 3:
                setattr(self, f"trans{b}", Transition(planes, planes))
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.conv1(x)
        x = self.trans1(self.dense1(x))
        x = self.trans2(self.dense2(x))
        x = self.dense3(x)
        x = self.avgpool(self.relu(self.bn(x))).flatten(1)
        return self.fc(x)


def _conv_sequence(model: DenseNetCifar) -> list[tuple[str, str]]:
    """(conv name, name of the BN-ReLU unit that consumes its output next) in forward order."""
    seq: list[str] = ["conv1"]
    for b in (1, 2, 3):
        seq += [f"dense{b}.{i}.conv1" for i in range(len(getattr(model, f"dense{b}")))]
        if b < 3:
            seq.append(f"trans{b}.conv1")
    units: list[str] = []
    for b in (1, 2, 3):
        units += [f"dense{b}.{i}" for i in range(len(getattr(model, f"dense{b}")))]
        if b < 3:
            units.append(f"trans{b}")
    units.append("")  # the final bn/relu
    # conv k's output is consumed first by unit k (the unit right after it in forward order).
    return list(zip(seq, units, strict=True))


def rate_entries(model: nn.Module) -> list[tuple[str, ...]]:
    """Stem; block 1; transition 1; block 2; transition 2; block 3 (39 entries for DenseNet-40)."""
    return [(conv,) for conv, _ in _conv_sequence(model)]


def rank_points(model: nn.Module) -> dict[str, RankPoint]:
    """The next BN-ReLU's output: the last ``growth`` channels for dense convs, all channels otherwise."""
    points: dict[str, RankPoint] = {}
    for conv, unit in _conv_sequence(model):
        relu = f"{unit}.relu" if unit else "relu"
        bn = model.get_submodule(f"{unit}.bn1" if unit else "bn")
        width = bn.num_features
        if conv.startswith("dense"):
            out = model.get_submodule(conv).out_channels
            points[conv] = RankPoint(relu, (width - out, width))
        else:
            points[conv] = RankPoint(relu)
    return points
