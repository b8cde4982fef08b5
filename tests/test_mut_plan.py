"""Mutation-killing tests for hrank.plan (bench/mutation.py, docs/mutation.md): the option-A shortcut pruner's
channel maps, selection inside a group (rule, blocks, missing scores) and the width rules, each checked against
an independent computation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from hrank.errors import HRankError
from hrank.models.base import ChannelPadShortcut
from hrank.plan import WIDTH_RULES, PlanGroup, ShortcutPruner, _conv_constraints, _select_for_group, select_kept


def _full_shortcut(cin: int, cout: int, x: torch.Tensor) -> torch.Tensor:
    """The unpruned option-A shortcut, written out: subsample by 2, zero-pad the channels on both sides."""
    pad = (cout - cin) // 2
    x = x[:, :, ::2, ::2]
    return torch.cat([x.new_zeros(x.shape[0], pad, *x.shape[2:]), x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1)


DROPS = [[], [0], [3], [0, 3], [1, 2], [0, 5, 7], [2, 3, 4, 5], [6, 7], [1, 4, 6]]


@pytest.mark.parametrize("drop", DROPS)
def test_shortcut_prune_out_channels_equals_slicing_the_full_output(drop):
    cin, cout = 4, 8
    torch.manual_seed(0)
    x = torch.randn(2, cin, 6, 6)
    layer = ChannelPadShortcut(cin, cout)
    assert torch.equal(layer(x), _full_shortcut(cin, cout, x))
    kept = [c for c in range(cout) if c not in drop]
    out = ShortcutPruner().prune_out_channels(layer, drop)
    assert out is layer
    assert (layer.in_channels, layer.out_channels) == (cin, len(kept))
    assert ShortcutPruner().get_out_channels(layer) == len(kept) and ShortcutPruner().get_in_channels(layer) == cin
    assert torch.equal(layer(x), _full_shortcut(cin, cout, x)[:, kept])


@pytest.mark.parametrize("drop", [[], [0], [3], [1, 2], [0, 3], [0, 1, 2]])
def test_shortcut_prune_in_channels_equals_the_full_map_on_zeroed_inputs(drop):
    cin, cout = 4, 8
    torch.manual_seed(1)
    x = torch.randn(2, cin, 6, 6)
    kept = [c for c in range(cin) if c not in drop]
    layer = ShortcutPruner().prune_in_channels(ChannelPadShortcut(cin, cout), drop)
    assert (layer.in_channels, layer.out_channels) == (len(kept), cout)
    assert ShortcutPruner().get_in_channels(layer) == len(kept) and ShortcutPruner().get_out_channels(layer) == cout
    zeroed = x.clone()
    zeroed[:, drop] = 0
    assert torch.equal(layer(x[:, kept]), _full_shortcut(cin, cout, zeroed))


def test_shortcut_pruned_on_both_sides_in_either_order():
    cin, cout = 4, 8
    torch.manual_seed(2)
    x = torch.randn(1, cin, 4, 4)
    drop_in, drop_out = [1], [0, 3, 6]
    kept_in = [c for c in range(cin) if c not in drop_in]
    kept_out = [c for c in range(cout) if c not in drop_out]
    zeroed = x.clone()
    zeroed[:, drop_in] = 0
    expected = _full_shortcut(cin, cout, zeroed)[:, kept_out]
    p = ShortcutPruner()
    a = p.prune_out_channels(p.prune_in_channels(ChannelPadShortcut(cin, cout), drop_in), drop_out)
    b = p.prune_in_channels(p.prune_out_channels(ChannelPadShortcut(cin, cout), drop_out), drop_in)
    for layer in (a, b):
        assert (layer.in_channels, layer.out_channels) == (len(kept_in), len(kept_out))
        assert torch.equal(layer(x[:, kept_in]), expected)
    # the exact maps: input 0 -> output 2 -> position 1; input 1 gone; inputs 2, 3 (now 1, 2) -> outputs 4, 5 -> 2, 3
    assert a.src.tolist() == b.src.tolist() == [0, 1, 2]
    assert a.dst.tolist() == b.dst.tolist() == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------
# selection
# --------------------------------------------------------------------------------------------------------

def _reference_kept(scores: np.ndarray, n: int) -> list[int]:
    """Drop the n lowest scores, lower index first among ties (written without argsort)."""
    ranked = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return sorted(ranked[n:])


@pytest.mark.parametrize("seed", range(6))
def test_select_kept_against_a_plain_reference(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 4, size=13).astype(float)  # many ties
    for n in range(13):
        assert select_kept(scores, n) == _reference_kept(scores, n)


def test_select_for_group_mean_of_members_and_rule():
    scores = {"a": np.array([5.0, 1.0, 3.0, 0.0, 4.0, 2.0, 9.0, 7.0]),
              "b": np.array([0.0, 9.0, 3.0, 8.0, 0.0, 2.0, 1.0, 1.0])}
    mean = (scores["a"] + scores["b"]) / 2  # [2.5, 5, 3, 4, 2, 2, 5, 4]
    for rate in (0.0, 0.1, 0.13, 0.25, 0.3, 0.5, 0.62, 0.875):
        n = int(rate * 8)
        got = _select_for_group(["a", "b", "unscored"], 8, rate, scores, "g")
        assert got == _reference_kept(mean, n)
    # a member without scores does not vote
    assert _select_for_group(["a", "x"], 8, 0.5, scores, "g") == _reference_kept(scores["a"], 4)
    # nothing pruned: every channel, even without scores; something pruned without scores: None
    assert _select_for_group(["x"], 8, 0.1, {}, "g") == list(range(8))
    assert _select_for_group(["x"], 8, 0.125, {}, "g") is None
    with pytest.raises(HRankError, match="all 8"):
        _select_for_group(["a"], 8, 1.0, scores, "g")


def test_select_for_group_blocks_drop_equally_within_each_block():
    scores = {"a": np.array([4.0, 3.0, 2.0, 1.0, 0.0, 5.0, 6.0, 7.0, 1.0, 1.0, 0.0, 9.0])}
    # 3 blocks of 4; rate 0.5 -> 6 filters -> 2 per block, each block its own lowest two
    got = _select_for_group(["a"], 12, 0.5, scores, "g", blocks=3)
    assert got == [0, 1, 6, 7, 9, 11]
    # 5 filters round down to 3 blocks x 1; 2 filters -> 0 per block -> nothing pruned
    assert _select_for_group(["a"], 12, 5 / 12 + 1e-9, scores, "g", blocks=3) == [0, 1, 2, 5, 6, 7, 8, 9, 11]
    assert _select_for_group(["a"], 12, 2 / 12 + 1e-9, scores, "g", blocks=3) == list(range(12))
    g = PlanGroup(["a"], 12, 0.5, got, blocks=3)
    assert g.block_counts() == [2, 2, 2]
    assert PlanGroup(["a"], 12, 0.5, [0, 1, 2, 4, 11], blocks=3).block_counts() == [3, 1, 1]
    assert PlanGroup(["a"], 6, 0.5, [0, 5], blocks=1).block_counts() == [2]


def test_width_rules():
    for rates in ([0.5], [0.3, 0.3, 0.3], [0.1, 0.2, 0.6], [0.0, 0.7], [0.25, 0.5, 0.5, 0.0]):
        assert WIDTH_RULES["mean"](rates) == pytest.approx(sum(rates) / len(rates), abs=1e-15)
        assert WIDTH_RULES["max"](rates) == max(rates) and WIDTH_RULES["min"](rates) == min(rates)
    assert WIDTH_RULES["mean"]([0.1, 0.1, 0.1]) == 0.1  # exact when the members agree (no fsum drift)
    assert WIDTH_RULES["mean"]([0.7] * 3) == 0.7 and sum([0.7] * 3) / 3 != 0.7
    assert WIDTH_RULES["mean"]([0.1, 0.2, 0.6]) == 0.3 and isinstance(WIDTH_RULES["mean"]([1, 1]), float)


# --------------------------------------------------------------------------------------------------------
# group constraints of one conv
# --------------------------------------------------------------------------------------------------------

def test_conv_constraints():
    plain = nn.Conv2d(8, 16, 3)
    assert _conv_constraints(plain, "c", True, True, 16) == (1, None)
    assert _conv_constraints(plain, "c", False, False, 8) == (1, None)  # a re-mapping is fine for a plain conv
    dw = nn.Conv2d(16, 16, 3, groups=16)
    assert _conv_constraints(dw, "dw", True, True, 16) == (1, None)  # depthwise is not "grouped"
    bad_dw = nn.Conv2d(8, 16, 3, groups=8)  # groups == in_channels != out_channels: grouped, two filters per group
    assert _conv_constraints(bad_dw, "g", True, True, 16) == (8, None)
    mult = nn.Conv2d(4, 8, 3, groups=8 // 2)
    assert _conv_constraints(mult, "m", True, True, 8) == (4, None)
    weird = nn.Conv2d(16, 8, 1, groups=8)  # groups == out_channels, in != out
    blocks, why = _conv_constraints(weird, "w", True, True, 8)
    assert blocks == 1 and "groups == out_channels" in why
    g4 = nn.Conv2d(16, 32, 3, groups=4)
    assert _conv_constraints(g4, "g4", True, True, 32) == (4, None)
    assert _conv_constraints(g4, "g4", False, True, 16) == (4, None)
    for out_side, identity, channels in ((True, False, 32), (False, True, 32), (True, True, 16)):
        blocks, why = _conv_constraints(g4, "g4", out_side, identity, channels)
        assert blocks == 1 and "re-mapping" in why
    one = nn.Conv2d(4, 32, 3, groups=4)  # reads one channel per group
    blocks, why = _conv_constraints(one, "one", False, True, 4)
    assert blocks == 1 and "one per group" in why
    assert _conv_constraints(nn.Conv2d(8, 16, 3, groups=8), "two", False, True, 8)[0] == 1  # 1 input per group
    tr = nn.ConvTranspose2d(16, 16, 3, groups=4)
    blocks, why = _conv_constraints(tr, "t", True, True, 16)
    assert blocks == 1 and "ConvTranspose2d" in why
    blocks, why = _conv_constraints(nn.Conv1d(4, 4, 3), "c1", True, True, 4)
    assert blocks == 1 and "only Conv2d" in why


def test_constraints_cover_every_grouping():
    for cin, cout, groups in itertools.product((4, 8), (4, 8), (1, 2, 4)):
        conv = nn.Conv2d(cin, cout, 1, groups=groups)
        blocks, why = _conv_constraints(conv, "c", True, True, cout)
        if groups == 1 or groups == cin == cout:
            assert (blocks, why) == (1, None)
        elif groups == cout and cin != cout:
            assert blocks == 1 and why
        elif cout // groups <= 1:
            assert blocks == 1 and "one per group" in why
        else:
            assert (blocks, why) == (groups, None)


# --------------------------------------------------------------------------------------------------------
# survivors of the first mutation run (docs/mutation.md)
# --------------------------------------------------------------------------------------------------------

def test_select_kept_compares_scores_as_float64():
    # 2**53 + 1 is not a float64: it rounds (half to even) to 2**53, so scores 0 and 1 tie and the lower
    # index (0) is dropped first, although as integers score 1 is the lowest
    big = 2**53
    assert float(big + 1) == float(big)
    assert select_kept(np.array([big + 1, big, big + 2], dtype=np.int64), 1) == [1, 2]
    assert select_kept([big + 1, big, big + 2], 1) == [1, 2]
    assert select_kept(np.array([big + 2, big + 1, big], dtype=np.int64), 2) == [0]
    if np.finfo(np.longdouble).eps < np.finfo(np.float64).eps:  # an extended long double (x86)
        scores = np.array([1.0, 1.0, 0.5], dtype=np.longdouble)
        scores[0] += np.longdouble(2) ** -60  # above score 1 in long double, equal to it in float64
        assert scores[0] > scores[1] and float(scores[0]) == float(scores[1])
        assert select_kept(scores, 2) == [1]


def _reference_constraint(cin: int, cout: int, groups: int, out_side: bool) -> tuple[int, str | None]:
    """The width rules for an identity mapping, written from the docs: plain and depthwise convs impose
    nothing; groups == out_channels with in != out is refused; a grouped conv with a single channel per group
    on this side cannot keep its blocks equal; otherwise the channels come in ``groups`` equal blocks."""
    if groups == 1 or groups == cin == cout:
        return 1, None
    if groups == cout:
        return 1, "groups == out_channels"
    if (cout if out_side else cin) == groups:
        return 1, ("writes" if out_side else "reads") + " these channels one per group"
    return groups, None


def test_conv_constraints_against_a_reference_for_every_small_conv():
    seen = set()
    for cin, cout in itertools.product(range(1, 9), repeat=2):
        for groups in (g for g in range(1, 9) if cin % g == 0 and cout % g == 0):
            conv = nn.Conv2d(cin, cout, 1, groups=groups)
            for out_side in (True, False):
                blocks, why = _conv_constraints(conv, "k", out_side, True, cout if out_side else cin)
                want_blocks, want_why = _reference_constraint(cin, cout, groups, out_side)
                assert blocks == want_blocks, (cin, cout, groups, out_side)
                if want_why is None:
                    assert why is None, (cin, cout, groups, out_side)
                else:
                    assert want_why in why and "conv k " in why, (cin, cout, groups, out_side, why)
                    seen.add(want_why)
    # every rule was exercised; a conv never *writes* one channel per group without being depthwise or refused
    assert seen == {"groups == out_channels", "reads these channels one per group"}


def test_conv_constraints_edge_cases_of_the_groups_rule():
    # a plain conv with a single filter: groups == 1 == out_channels is not the refused case
    assert _conv_constraints(nn.Conv2d(4, 1, 3), "one", True, True, 1) == (1, None)
    assert _conv_constraints(nn.Conv2d(4, 1, 3), "one", False, True, 4) == (1, None)
    # groups == out_channels == 2 != in_channels is refused from both sides
    for out_side, channels in ((True, 2), (False, 4)):
        blocks, why = _conv_constraints(nn.Conv2d(4, 2, 1, groups=2), "g2", out_side, True, channels)
        assert blocks == 1 and why == "conv g2 has groups == out_channels but in_channels != out_channels"
    blocks, why = _conv_constraints(nn.Conv2d(6, 12, 3, groups=6), "r", False, True, 6)
    assert (blocks, why) == (1, "grouped conv r (groups=6) reads these channels one per group")


def test_conv_constraints_names_the_unsupported_layer_type():
    assert _conv_constraints(nn.Conv1d(4, 4, 3), "c1", True, True, 4) == (
        1, "c1 is a Conv1d (only Conv2d and ConvTranspose2d are supported)")
    assert _conv_constraints(nn.Linear(4, 4), "fc", False, True, 4)[1].startswith("fc is a Linear ")
