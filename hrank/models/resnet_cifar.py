"""CIFAR ResNets (He et al. 2016) with the parameter-free option-A shortcut, laid out as HRank's resnet_cifar."""

from __future__ import annotations

from torch import nn

from hrank.models.base import ChannelPadShortcut, RankPoint


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, add the shortcut, ReLU. ``relu2`` is the post-add activation HRank hooks."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        if stride != 1 or in_planes != planes:
            self.shortcut: nn.Module = ChannelPadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNetCifar(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem 16, three stages of n blocks at 16/32/64 channels."""

    def __init__(self, depth: int, num_classes: int = 10, classifier_name: str = "fc") -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.classifier_name = classifier_name
        self.conv1 = _conv3x3(3, 16)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 16
        for stage, planes in enumerate((16, 32, 64), start=1):
            blocks = []
            for b in range(n):
                stride = 2 if (stage > 1 and b == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        setattr(self, classifier_name, nn.Linear(64, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = self.avgpool(x).flatten(1)
        return getattr(self, self.classifier_name)(x)


def _blocks(model: ResNetCifar):
    for stage in (1, 2, 3):
        for b, _ in enumerate(getattr(model, f"layer{stage}")):
            yield f"layer{stage}.{b}"


def rate_entries(model: nn.Module) -> list[tuple[str, ...]]:
    """HRank order: the stem, then (conv1, conv2) of every block."""
    entries: list[tuple[str, ...]] = [("conv1",)]
    for blk in _blocks(model):
        entries += [(f"{blk}.conv1",), (f"{blk}.conv2",)]
    return entries


def rank_points(model: nn.Module) -> dict[str, RankPoint]:
    """Stem ReLU; block relu1 for conv1; block relu2 (after the residual add) for conv2."""
    points = {"conv1": RankPoint("relu")}
    for blk in _blocks(model):
        points[f"{blk}.conv1"] = RankPoint(f"{blk}.relu1")
        points[f"{blk}.conv2"] = RankPoint(f"{blk}.relu2")
    return points


def resnet_cifar(depth: int):
    """A builder for ResNet-``depth``; ResNet-110 names its classifier ``linear`` as the official code does."""

    def build(num_classes: int = 10) -> ResNetCifar:
        return ResNetCifar(depth, num_classes, classifier_name="linear" if depth == 110 else "fc")

    build.__name__ = f"resnet_{depth}"
    return build
