"""BatchNorm folding (hrank.fold): exact where it folds, untouched where a fold would not be exact."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hrank import models
from hrank.errors import HRankError
from hrank.fold import fold_batchnorm
from hrank.plan import make_plan
from hrank.prune import apply_plan
from hrank.spec import Spec


def _random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a wrong fold shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) * 2 + 0.2)
            if m.affine:
                m.weight.data.copy_(torch.randn(c, generator=g))
                m.bias.data.copy_(torch.randn(c, generator=g))
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _bns(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_folds_every_bn_of_a_resnet_exactly_and_leaves_the_callers_model_alone():
    torch.manual_seed(0)
    net = _random_bn(models.create("resnet_20")).train()
    before = copy.deepcopy(net.state_dict())
    x = torch.randn(4, 3, 32, 32)
    res = fold_batchnorm(net, x)
    assert _bns(res.model) == 0 and res.kept == []
    assert len(res.folded) == _bns(net) == 19  # stem + 2 per block x 9 blocks
    assert res.folded["bn1"] == "conv1" and res.folded["layer1.0.bn2"] == "layer1.0.conv2"
    # the caller's model: same weights, still in training mode
    assert net.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    ref, got = _outputs(net, x), _outputs(res.model, x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert res.max_rel_diff < 1e-5


def test_folds_a_physically_pruned_model_exactly():
    torch.manual_seed(1)
    net = _random_bn(models.create("resnet_20"))
    convs = [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    scores = {n: torch.rand(net.get_submodule(n).out_channels).numpy() for n in convs}
    spec = Spec.from_string(net, "[0.0]+[0.5]*18")
    pruned = apply_plan(copy.deepcopy(net), make_plan(net, scores, spec), mode="physical")
    x = torch.randn(3, 3, 32, 32)
    res = fold_batchnorm(pruned, x)
    assert _bns(res.model) == 0
    # the folded convs have the pruned widths and carry a bias now
    assert res.model.get_submodule("layer1.0.conv1").out_channels == pruned.layer1[0].conv1.out_channels == 8
    assert res.model.get_submodule("layer1.0.conv1").bias is not None
    assert torch.allclose(_outputs(res.model, x), _outputs(pruned, x), rtol=1e-4, atol=1e-5)


class _Shapes(nn.Module):
    """Every case a fold must not touch, next to ones it must fold."""

    def __init__(self) -> None:
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn_plain = nn.BatchNorm2d(8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)  # called twice, each time before another BN
        self.bn_s1, self.bn_s2 = nn.BatchNorm2d(8), nn.BatchNorm2d(8)
        self.tapped = nn.Conv2d(8, 8, 1)  # its output also feeds an addition
        self.bn_tapped = nn.BatchNorm2d(8)
        self.no_stats = nn.Conv2d(8, 8, 1)
        self.bn_no_stats = nn.BatchNorm2d(8, track_running_stats=False)  # batch statistics even in eval
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_depthwise = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn_plain(self.plain(x)))
        x = self.bn_s1(self.shared(x)) + self.bn_s2(self.shared(x))
        t = self.tapped(x)
        x = self.bn_tapped(t) + t
        x = self.bn_no_stats(self.no_stats(x))
        x = self.bn_depthwise(self.depthwise(x))
        return self.head(x.mean((2, 3)))


def test_folds_only_where_the_fold_is_exact():
    torch.manual_seed(2)
    net = _random_bn(_Shapes())
    x = torch.randn(5, 3, 16, 16)
    res = fold_batchnorm(net, x)
    assert res.folded == {"bn_plain": "plain", "bn_depthwise": "depthwise"}
    assert sorted(res.kept) == ["bn_no_stats", "bn_s1", "bn_s2", "bn_tapped"]
    assert torch.allclose(_outputs(res.model, x), _outputs(net, x), rtol=1e-4, atol=1e-5)


class _ScaledConv(nn.Conv2d):
    """A conv subclass with its own forward: folding the BN into its weight would be wrong."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2 + 1


def test_a_conv_subclass_or_a_mismatched_pair_is_not_folded():
    torch.manual_seed(3)
    net = _random_bn(nn.Sequential(_ScaledConv(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 1),
                                   nn.BatchNorm2d(4)))
    x = torch.randn(2, 3, 8, 8)
    res = fold_batchnorm(net, x)
    assert res.folded == {"4": "3"} and res.kept == ["1"]
    assert torch.allclose(_outputs(res.model, x), _outputs(net, x), rtol=1e-4, atol=1e-5)


class _Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if y.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return y
        return -y


def test_an_untraceable_model_is_one_clear_error():
    with pytest.raises(HRankError, match="cannot fold BatchNorm: torch.fx cannot trace"):
        fold_batchnorm(_Branchy(), torch.randn(1, 3, 8, 8))
