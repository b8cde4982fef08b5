"""Mutation-killing tests for hrank.budget (bench/mutation.py, docs/mutation.md): the cost model must predict
the MACs and params of the physically pruned network exactly for any number of filters removed per group
(plain, biased, grouped, depthwise, transposed convs and a flattened linear), and the step lists must be the
widths the docstring promises."""

from __future__ import annotations

import copy
from decimal import Decimal

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


def _cost_model(model: nn.Module, x: torch.Tensor) -> tuple[list, _CostModel]:
    """The prunable groups of ``model`` and the budget's cost model over them, for input ``x``."""
    graph = build_dependency_graph(model, x)
    groups = [g for g in find_groups(model, x, graph=graph) if g.prunable]
    return groups, _CostModel(model, graph, groups, tuple(x.shape[1:]))


@pytest.mark.parametrize("seed", range(4))
def test_cost_model_equals_the_pruned_network(seed):
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(1, 3, 4, 4)
    groups, cost = _cost_model(model, x)
    assert {g.members[0] for g in groups} >= {"a", "g", "b", "up", "c"}
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
    groups, cost = _cost_model(model, x)
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


# ---- readable_rate: the shortest decimal that prunes exactly n filters under HRank's int(rate * C) ------------

def _digits(rate: float) -> int:
    """Decimal digits of a rate as Python prints it (0.32 -> 2, 0.5 -> 1, 0.0 -> 0)."""
    return max(0, -Decimal(repr(rate)).normalize().as_tuple().exponent)


def _shortest(n: int, channels: int, max_digits: int) -> tuple[int, float] | None:
    """Brute force: the fewest digits d (up to ``max_digits``) such that some k / 10**d prunes exactly n of
    ``channels`` under HRank's float rule, and the smallest such rate; None when no decimal that short works."""
    for d in range(1, max_digits + 1):
        scale = 10**d
        k = max(0, n * scale // channels - 2)  # just below n / C; int(k / scale * C) never decreases with k
        while int(k / scale * channels) <= n:
            if int(k / scale * channels) == n:
                return d, k / scale
            k += 1
    return None


def test_readable_rate_is_a_shortest_decimal_for_every_width_up_to_300():
    for channels in range(1, 301):
        assert readable_rate(0, channels) == 0.0
        for n in range(1, channels):
            r = readable_rate(n, channels)
            assert int(r * channels) == n, (n, channels, r)
            digits, smallest = _shortest(n, channels, 9)
            assert _digits(r) == digits, (n, channels, r, smallest)


def test_readable_rate_hand_examples():
    assert readable_rate(5, 16) == 0.32  # the docstring's: 0.3 prunes 4 (4.8), 0.32 prunes 5 (5.12)
    assert readable_rate(1, 3) == 0.4  # 0.4 * 3 = 1.2 (0.3 * 3 = 0.9)
    assert readable_rate(2, 3) == 0.7  # 2.1
    assert readable_rate(63, 90) == 0.71  # 0.7 * 90 = 62.99999999999999 in floats: 0.7 prunes 62
    assert readable_rate(29, 100) == 0.291  # 0.29 * 100 = 28.999999999999996 and 0.3 prunes 30
    assert readable_rate(7, 7) == 1.0
    assert readable_rate(12, 8) == 1.5  # n > C (not a rate hrank uses, but the same rule)


def test_readable_rate_where_float_quotients_land_one_below():
    # 29 / 50 * 100 = 57.99999999999999 in floats: a search from that quotient tried 0.58 (prunes 28) twice
    # and returned 0.581; 0.59 prunes 29 (29.5)
    assert int(0.59 * 50) == 29 and int(0.58 * 50) == 28
    assert readable_rate(29, 50) == 0.59
    assert readable_rate(57, 100) == 0.58  # 0.57 * 100 = 56.99999999999999 and 0.58 * 100 = 57.99999999999999


@pytest.mark.parametrize("n", [1, 2, 1_000_000_001, 1_500_000_001, 2_999_999_999])
def test_readable_rate_falls_back_to_the_middle_of_the_interval(n):
    """No decimal of at most 9 digits prunes exactly n of 3e9 channels (the interval [n/C, (n+1)/C) is
    narrower than 1e-9): the rate is the middle of the interval, (n + 0.5) / C."""
    channels = 3_000_000_019
    assert _shortest(n, channels, 9) is None
    assert _shortest(n, channels, 10) is not None  # a 10-digit decimal would do: the cap is 9 digits
    r = readable_rate(n, channels)
    assert r == (n + 0.5) / channels
    assert int(r * channels) == n


def test_readable_rate_nine_digits_still_found_for_a_wide_interval():
    channels = 400_000_000  # interval width 2.5e-9: some 9-digit decimal always fits
    for n in (1, 3, 123_456_789, 399_999_999):
        r = readable_rate(n, channels)
        assert int(r * channels) == n
        assert _digits(r) == _shortest(n, channels, 9)[0]


# ---- the cost model on more layer shapes ----------------------------------------------------------------------

class Gain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.tensor(1.5))


class GainConv(nn.Conv2d):
    """A conv with a child module holding a learned scalar gain (a parameter of the child, not of the conv)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = Gain()

    def forward(self, x):
        return super().forward(x) * self.gain.value


class Odd(nn.Module):
    """Non-square kernels, a CReLU residual (b reads cat([y, -y]): each of y's channels twice, and writes y),
    a conv subclass with a child parameter, a pooled linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, (1, 3), padding=(0, 1))
        self.b = nn.Conv2d(16, 8, (3, 1), padding=(1, 0), bias=False)
        self.n = GainConv(8, 6, (3, 2), padding=(1, 0))
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        y = y + self.b(torch.cat([y, -y], 1))
        y = torch.relu(self.n(torch.relu(y)))
        return self.fc(y.mean((2, 3)))


def _odd_hand_counts(ka: int, kn: int) -> tuple[int, int]:
    """MACs and params of Odd (input 3 x 5 x 6) with ka channels removed from the a/b stream and kn from n,
    written out per layer: a and b keep 5 x 6 outputs, n (3 x 2 kernel, padding 1 x 0) gives 5 x 5."""
    wa, wn = 8 - ka, 6 - kn
    macs = 3 * wa * 1 * 3 * 30 + 2 * wa * wa * 3 * 1 * 30 + wa * wn * 3 * 2 * 25 + wn * 3
    params = (3 * wa * 3 + wa) + 2 * wa * wa * 3 + (wa * wn * 6 + wn + 1) + (wn * 3 + 3)
    return macs, params


def _odd_setup():
    torch.manual_seed(2)
    model = Odd().eval()
    x = torch.randn(1, 3, 5, 6)
    groups, cost = _cost_model(model, x)
    assert [g.members for g in groups] == [("a", "b"), ("n",)]
    return model, x, groups, cost


def test_cost_model_hand_counts_non_square_kernels_crelu_and_a_conv_with_a_child_parameter():
    model, x, groups, cost = _odd_setup()
    base = flops.count(model, (3, 5, 6))
    assert (base.macs, base.params) == _odd_hand_counts(0, 0)
    scores = {n: np.random.default_rng(3).random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}
    for ka in range(8):
        for kn in (0, 1, 5):
            assert cost([ka, kn]) == _odd_hand_counts(ka, kn), (ka, kn)
            spec = {"a": _rate(ka, 8), "b": _rate(ka, 8), "n": _rate(kn, 6)}
            pruned = apply_plan(copy.deepcopy(model), make_plan(model, scores, spec, example_input=x, groups=groups),
                                example_input=x)
            real = flops.count(pruned, (3, 5, 6))
            assert (real.macs, real.params) == _odd_hand_counts(ka, kn), (ka, kn)


def test_cost_model_counts_are_exact_integers():
    torch.manual_seed(0)
    model = Mixed().eval()  # plain, depthwise, grouped, transposed convs and a linear
    x = torch.randn(1, 3, 4, 4)
    groups, cost = _cost_model(model, x)
    for counts in ([0] * len(groups), [g.blocks for g in groups]):
        macs, params = cost(counts)
        assert type(macs) is int and type(params) is int, (macs, params)


def test_cost_model_rejects_a_count_list_of_the_wrong_length():
    _, _, groups, cost = _odd_setup()
    assert cost([1, 1]) == _odd_hand_counts(1, 1)
    for counts in ([1], [1, 1, 0], []):
        with pytest.raises(ValueError):
            cost(counts)
