"""Mutation-killing tests for hrank.budget (bench/mutation.py, docs/mutation.md): the cost model must predict
the MACs and params of the physically pruned network exactly for any number of filters removed per group
(plain, biased, grouped, depthwise, transposed convs and a flattened linear), and the step lists must be the
widths the docstring promises."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from hrank import flops
from hrank.budget import _CostModel, _steps, readable_rate
from hrank.layers import is_conv
from hrank.plan import build_dependency_graph, find_groups, make_plan
from hrank.prune import apply_plan
from hrank.spec import num_pruned


class Mixed(nn.Module):
    """conv(bias) -> depthwise -> grouped(4) -> 1x1 -> residual add with a 1x1 branch -> transposed -> conv ->
    flatten -> linear(bias): every kind of layer the cost model distinguishes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=True)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.g = nn.Conv2d(16, 24, 3, padding=1, groups=4, bias=True)
        self.b = nn.Conv2d(24, 12, 1, bias=False)
        self.skip = nn.Conv2d(3, 12, 1, stride=1, bias=True)
        self.up = nn.ConvTranspose2d(12, 10, 2, stride=2, bias=True)
        self.c = nn.Conv2d(10, 6, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        y = torch.relu(self.dw(torch.relu(self.a(x))))
        y = torch.relu(self.b(torch.relu(self.g(y))) + self.skip(x))
        y = torch.relu(self.bn(self.c(torch.relu(self.up(y)))))
        return self.fc(y.flatten(1))


def _rate(n: int, channels: int) -> float:
    r = readable_rate(n, channels)
    assert num_pruned(r, channels) == n
    return r


@pytest.mark.parametrize("seed", range(4))
def test_cost_model_equals_the_pruned_network(seed):
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(1, 3, 4, 4)
    graph = build_dependency_graph(model, x)
    groups = [g for g in find_groups(model, x, graph=graph) if g.prunable]
    assert {g.members[0] for g in groups} >= {"a", "g", "b", "up", "c"}
    cost = _CostModel(model, graph, groups, (3, 4, 4))
    base = flops.count(model, (3, 4, 4))
    assert cost([0] * len(groups)) == (base.macs, base.params)
    rng = np.random.default_rng(seed)
    scores = {n: rng.random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}
    for trial in range(3):
        counts = []
        for g in groups:
            k = int(rng.integers(0, g.channels // g.blocks)) * g.blocks
            counts.append(0 if trial == 0 and len(counts) % 2 else k)
        spec = {m: _rate(k, g.channels) for g, k in zip(groups, counts, strict=True) for m in g.members}
        plan = make_plan(model, scores, spec, example_input=x, groups=groups)
        pruned = apply_plan(copy.deepcopy(model), plan, example_input=x)
        real = flops.count(pruned, (3, 4, 4))
        assert cost(counts) == (real.macs, real.params), counts


def test_cost_model_single_groups_one_at_a_time():
    torch.manual_seed(1)
    model = Mixed().eval()
    x = torch.randn(1, 3, 4, 4)
    graph = build_dependency_graph(model, x)
    groups = [g for g in find_groups(model, x, graph=graph) if g.prunable]
    cost = _CostModel(model, graph, groups, (3, 4, 4))
    scores = {n: np.arange(m.out_channels, dtype=float) for n, m in model.named_modules() if is_conv(m)}
    for i, g in enumerate(groups):
        k = g.blocks * max(1, (g.channels // g.blocks) // 2)
        counts = [0] * len(groups)
        counts[i] = k
        spec = {m: _rate(k, g.channels) for m in g.members}
        pruned = apply_plan(copy.deepcopy(model), make_plan(model, scores, spec, example_input=x, groups=groups),
                            example_input=x)
        real = flops.count(pruned, (3, 4, 4))
        assert cost(counts) == (real.macs, real.params), g.members


def _reference_steps(channels: int, limit: int, round_to: int, blocks: int) -> list[int]:
    out = []
    for k in range(1, limit + 1):
        width = channels - k
        if round_to > 1 and width % round_to:
            continue
        if k % blocks:
            continue
        out.append(k)
    return out


def test_steps():
    assert _steps(16, 15, 1) == list(range(1, 16))
    assert _steps(16, 14, 8) == [8]
    assert _steps(16, 15, 4, 1) == [4, 8, 12]
    assert _steps(20, 18, 8) == [4, 12]
    assert _steps(12, 11, 1, 4) == [4, 8]
    assert _steps(24, 20, 8, 4) == [8, 16]
    assert _steps(5, 0, 1) == []
    for channels in (6, 16, 24, 30):
        for limit in (0, 1, channels // 2, channels - 1):
            for round_to in (1, 2, 3, 8):
                for blocks in (1, 2, 3):
                    assert _steps(channels, limit, round_to, blocks) == \
                        _reference_steps(channels, limit, round_to, blocks)
