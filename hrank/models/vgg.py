"""VGG-16 with BatchNorm for CIFAR, laid out as HRank's vgg_16_bn (module names use the cfg index)."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from hrank.models.base import RankPoint

CFG_16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class VGGCifar(nn.Module):
    """13 conv3x3(bias)+BN+ReLU, four max-pools, AvgPool2d(2), Linear-BN1d-ReLU-Linear head."""

    def __init__(self, num_classes: int = 10, cfg: list | None = None) -> None:
        super().__init__()
        self.cfg = list(cfg or CFG_16)
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        in_ch = 3
        for i, x in enumerate(self.cfg):
            if x == "M":
                layers[f"pool{i}"] = nn.MaxPool2d(kernel_size=2, stride=2)
            else:
                layers[f"conv{i}"] = nn.Conv2d(in_ch, x, kernel_size=3, padding=1, bias=True)
                layers[f"norm{i}"] = nn.BatchNorm2d(x)
                layers[f"relu{i}"] = nn.ReLU(inplace=True)
                in_ch = x
        self.features = nn.Sequential(layers)
        self.avgpool = nn.AvgPool2d(2)
        self.classifier = nn.Sequential(
            OrderedDict(
                linear1=nn.Linear(in_ch, 512),
                norm1=nn.BatchNorm1d(512),
                relu1=nn.ReLU(inplace=True),
                linear2=nn.Linear(512, num_classes),
            )
        )

    def forward(self, x):
        x = self.avgpool(self.features(x)).flatten(1)
        return self.classifier(x)


def _conv_indices(model: VGGCifar) -> list[int]:
    return [i for i, x in enumerate(model.cfg) if x != "M"]


def rate_entries(model: nn.Module) -> list[tuple[str, ...]]:
    """Entry i is conv i+1; the official code forces the 13th entry to 0 (see ``fixed_zero_entries``)."""
    return [(f"features.conv{i}",) for i in _conv_indices(model)]


def rank_points(model: nn.Module) -> dict[str, RankPoint]:
    """The conv's ReLU, or the MaxPool right after it; the last conv has none (HRank never prunes it)."""
    points: dict[str, RankPoint] = {}
    idx = _conv_indices(model)
    for i in idx[:-1]:
        nxt = i + 1
        module = f"features.pool{nxt}" if nxt < len(model.cfg) and model.cfg[nxt] == "M" else f"features.relu{i}"
        points[f"features.conv{i}"] = RankPoint(module)
    return points
