"""Models a bug hunt brought: layers that run only in training, grouped convs that read and write one
residual stream, ops that change the channel count (pixel shuffle, matrix products), grouped transposed
convs, outputs hrank cannot compare, weight norms. Each is pruned correctly or refused in one line; none
is pruned into a network that computes something else or crashes later."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hrank.errors import HRankError
from hrank.fold import fold_batchnorm
from hrank.layers import is_conv
from hrank.modelcopy import copy_model
from hrank.plan import PlanGroup, build_dependency_graph, find_groups, make_plan
from hrank.prune import apply_plan


def _scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}


def _groups(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    return {m: g for g in find_groups(model, x) for m in g.members}


class AuxHead(nn.Module):
    """An auxiliary classifier on c1's channels that runs only in training mode (GoogLeNet, Inception)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.aux, self.fc = nn.Linear(16, 10), nn.Linear(32, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        out = self.fc(torch.relu(self.b2(self.c2(y))).mean((2, 3)))
        if self.training:
            return out, self.aux(y.mean((2, 3)))
        return out


def test_channels_read_by_a_training_only_head_are_not_pruned():
    torch.manual_seed(0)
    model, x = AuxHead(), torch.randn(1, 3, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    groups = _groups(model, x)
    assert not groups["c1"].prunable and "aux" in groups["c1"].reason and "training" in groups["c1"].reason
    assert groups["c2"].prunable
    # looking at the model in training mode changed nothing: BatchNorm statistics, modes
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.training and all(m.training for m in model.modules())
    with pytest.raises(HRankError, match="only in training mode"):
        make_plan(model, _scores(model), {"c1": 0.5}, example_input=x)
    plan = make_plan(model, _scores(model), {"c*": 0.5}, example_input=x)  # a pattern skips c1, prunes c2
    assert [s["conv"] for s in plan.skipped] == ["c1"]
    apply_plan(model, plan, example_input=x)
    assert model.c2.out_channels == 16 and model.c1.out_channels == 16
    model.train()
    out, aux = model(torch.randn(2, 3, 8, 8))  # still trains
    assert out.shape == aux.shape == (2, 10)


def test_a_hand_made_plan_through_a_training_only_head_is_refused_whole():
    model, x = AuxHead(), torch.randn(1, 3, 8, 8)
    plan = make_plan(model, _scores(model), {"c2": 0.5}, example_input=x)
    plan.groups.append(PlanGroup(["c1"], 16, 0.5, list(range(8))))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(HRankError, match="training"):
        apply_plan(model, plan, example_input=x)
    assert model.c1.out_channels == 16 and model.aux.in_features == 16 and model.c2.out_channels == 32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class GroupedResidual(nn.Module):
    """A grouped (not depthwise) conv that reads and writes the same residual stream."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.b0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.g, self.b1 = nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.b0(self.stem(x)))
        y = y + self.b1(self.g(y))
        return self.fc(y.mean((2, 3)))


def test_grouped_conv_in_its_own_residual_stream():
    torch.manual_seed(0)
    model, x = GroupedResidual().eval(), torch.randn(2, 3, 8, 8)
    group = _groups(model, x)["g"]
    assert set(group.members) == {"stem", "g"} and group.blocks == 4 and group.prunable
    plan = make_plan(model, _scores(model), {"stem": 0.5}, example_input=x)
    physical = apply_plan(copy.deepcopy(model), plan, example_input=x)  # checks physical == mask itself
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask", example_input=x)
    assert (physical.g.in_channels, physical.g.out_channels, physical.g.groups) == (8, 8, 4)
    assert physical.g.weight.shape == (8, 2, 3, 3)
    # the kept filters of g with each one's own input columns, taken from the unpruned weight
    kept = plan.groups[0].kept
    for row, o in enumerate(kept):
        block = o // 4
        cols = [c - block * 4 for c in kept if c // 4 == block]
        assert torch.equal(physical.g.weight[row], model.g.weight[o, cols])
    z = torch.randn(4, 3, 8, 8)
    assert torch.allclose(physical.eval()(z), masked.eval()(z), atol=1e-5)


class PixelShuffleNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 12, 3, padding=1)
        self.ps, self.c3 = nn.PixelShuffle(2), nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.c3(self.ps(self.c2(torch.relu(self.c1(x))))).mean((2, 3))


class BilinearPool(nn.Module):
    """Bilinear (second-order) pooling: the C x C Gram matrix of c2's channels feeds the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1), nn.Linear(64, 10)

    def forward(self, x):
        f = torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(2)
        return self.fc((torch.bmm(f, f.transpose(1, 2)) / f.shape[2]).flatten(1))


@pytest.mark.parametrize("cls, op", [(PixelShuffleNet, "pixelshuffle"), (BilinearPool, "bmm")])
@pytest.mark.parametrize("mode, check", [("physical", True), ("physical", False), ("mask", False)])
def test_ops_that_change_the_channel_count_are_not_pruned_through(cls, op, mode, check):
    model, x = cls(), torch.randn(1, 3, 8, 8)
    scores = _scores(model)
    groups = _groups(model, x)
    assert groups["c1"].prunable
    assert not groups["c2"].prunable and op in groups["c2"].reason
    plan = make_plan(model, scores, {"c*": 0.5}, example_input=x)
    assert "c2" in [s["conv"] for s in plan.skipped]
    apply_plan(model, plan, example_input=x, mode=mode, check=check)
    assert model.c2.out_channels == model.c2.weight.shape[0] and model(x).shape[0] == 1
    with pytest.raises(HRankError, match=op):  # an exact name: one line, whatever the mode or check
        make_plan(cls(), scores, {"c2": 0.5}, example_input=x)
    bad = make_plan(cls(), scores, {"c1": 0.5}, example_input=x)
    bad.groups.append(PlanGroup(["c2"], cls().c2.out_channels, 0.5, [0, 1, 2, 3]))
    with pytest.raises(HRankError, match=op):
        apply_plan(cls(), bad, example_input=x, mode=mode, check=check)


def test_grouped_transposed_conv_is_refused_and_listed_once():
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.up = nn.Conv2d(3, 16, 3, padding=1), nn.ConvTranspose2d(16, 16, 2, stride=2, groups=16)
            self.c2 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.relu(self.up(torch.relu(self.c1(x))))).mean((2, 3))

    model, x = Up(), torch.randn(1, 3, 8, 8)
    found = find_groups(model, x)
    members = [m for g in found for m in g.members]
    assert sorted(members) == ["c1", "c2", "up"]  # every conv in exactly one group
    group = _groups(model, x)["up"]
    assert set(group.members) == {"c1", "up"} and not group.prunable and "ConvTranspose2d up" in group.reason
    for mode in ("physical", "mask"):
        with pytest.raises(HRankError, match="ConvTranspose2d"):
            apply_plan(Up(), make_plan(Up(), _scores(model), {"c1": 0.5}, example_input=x), mode=mode,
                       example_input=x)


class Boxed:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t

    def __iter__(self):
        return iter([self.t])


@pytest.mark.parametrize("wrap, match", [(Boxed, "object of type Boxed"),
                                         (lambda t: {"n": 3}, "holds no tensor|cannot trace")])
def test_outputs_hrank_cannot_compare_are_refused(wrap, match):
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return wrap(self.c2(torch.relu(self.c1(x))).mean((2, 3)))

    model, x = M(), torch.randn(1, 3, 8, 8)
    with pytest.raises(HRankError, match=match):
        apply_plan(model, make_plan(model, _scores(model), {"c1": 0.5}, example_input=x), example_input=x)
    assert model.c1.out_channels == 16 and getattr(model, "hrank_plan", None) is None


def test_weight_norm_conv_is_refused_and_copies_fail_in_one_line():
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.utils.weight_norm(nn.Conv2d(3, 16, 3, padding=1))
            self.c2 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            return self.c2(torch.relu(self.c1(x))).mean((2, 3))

    model, x = M(), torch.randn(1, 3, 8, 8)
    group = _groups(model, x)["c1"]
    assert not group.prunable and "weight norm" in group.reason
    model(x).sum().backward()  # the computed weight is now a non-leaf tensor: deepcopy refuses
    with pytest.raises(HRankError, match="parametrizations.weight_norm"):
        copy_model(model)
    with pytest.raises(HRankError, match="cannot copy the model"):  # folding works on a copy
        fold_batchnorm(model, x)


def test_trace_is_batched():
    """Torch-Pruning unpacks a bare tensor as arguments: a batch of one would be traced unbatched."""
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.Linear(16 * 64, 10)
            self.dims: list[int] = []

        def forward(self, x):
            self.dims.append(x.dim())
            return self.fc(torch.relu(self.c1(x)).view(x.size(0), -1))

    model = M()
    build_dependency_graph(model, torch.randn(1, 3, 8, 8))
    assert model.dims and set(model.dims) == {4}
