"""ResNet-50 for ImageNet in torchvision's layout (stride on the 3x3 conv), with named ReLUs for hooks."""

from __future__ import annotations

from torch import nn

from hrank.models.base import RankPoint


class Bottleneck(nn.Module):
    """1x1-3x3-1x1 with expansion 4; ``relu3`` is the post-add activation."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + identity)


class ResNetImageNet(nn.Module):
    """Stem 7x7/2 + max-pool, four stages of bottlenecks, global average pool, ``fc``."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers, strict=True), start=1):
            blocks = []
            for b in range(n):
                blocks.append(Bottleneck(in_planes, planes, stride=2 if (i > 1 and b == 0) else 1))
                in_planes = planes * Bottleneck.expansion
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def _blocks(model: nn.Module):
    for stage in (1, 2, 3, 4):
        for b, blk in enumerate(getattr(model, f"layer{stage}")):
            yield f"layer{stage}.{b}", blk


def rate_entries(model: nn.Module) -> list[tuple[str, ...]]:
    """The model constructor's layout: stem; per block [downsample (block 0 only), conv1, conv2, conv3]."""
    entries: list[tuple[str, ...]] = [("conv1",)]
    for name, blk in _blocks(model):
        if blk.downsample is not None:
            entries.append((f"{name}.downsample.0",))
        entries += [(f"{name}.conv1",), (f"{name}.conv2",), (f"{name}.conv3",)]
    return entries


def rank_points(model: nn.Module) -> dict[str, RankPoint]:
    """Stem after the max-pool; relu1, relu2; the post-add relu3 for conv3 and the downsample conv."""
    points = {"conv1": RankPoint("maxpool")}
    for name, blk in _blocks(model):
        points[f"{name}.conv1"] = RankPoint(f"{name}.relu1")
        points[f"{name}.conv2"] = RankPoint(f"{name}.relu2")
        points[f"{name}.conv3"] = RankPoint(f"{name}.relu3")
        if blk.downsample is not None:
            points[f"{name}.downsample.0"] = RankPoint(f"{name}.relu3")
    return points
