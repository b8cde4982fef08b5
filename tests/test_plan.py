"""Plans: coupled groups, the official selection reproduced, HRank-rule counts, JSON, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrank import models
from hrank.errors import HRankError
from hrank.plan import Plan, find_groups, make_plan, select_kept
from hrank.prune import hrank_rule_counts
from hrank.spec import Spec

SMALL_INPUT = {"resnet_50": torch.zeros(1, 3, 32, 32)}  # groups do not depend on resolution


@pytest.fixture(scope="module")
def selection(reference_dir):
    return json.loads((reference_dir / "official_selection.json").read_text())


@pytest.fixture(scope="module")
def official_counts(reference_dir):
    return json.loads((reference_dir / "official_flops_params.json").read_text())


def official_scores(reference_dir, arch: str, convs: list[dict]) -> dict[str, np.ndarray]:
    folder = reference_dir / "official_ranks" / arch
    return {c["module"]: np.load(folder / c["rank_file"]) for c in convs}


def check_official_kept(kept: list[int], conv: dict, rank: np.ndarray) -> None:
    """Equal to the official kept set, or (at a boundary tie) any equally valid choice."""
    if not conv["boundary_tie"]:
        assert kept == conv["kept"], conv["module"]
        return
    t = conv["tie_value"]
    kept_set = set(kept)
    assert {i for i in range(len(rank)) if rank[i] > t} <= kept_set, conv["module"]
    assert not {i for i in range(len(rank)) if rank[i] < t} & kept_set, conv["module"]
    assert len(kept_set & set(conv["tie_group"])) == conv["tie_group_num_kept"], conv["module"]


def test_select_kept_is_hrank_rule_with_stable_ties():
    assert select_kept(np.array([3.0, 1.0, 2.0, 0.5]), 2) == [0, 2]
    assert select_kept(np.array([1.0, 0.0, 0.0, 0.0, 2.0]), 2) == [0, 3, 4]  # lower index pruned first
    assert select_kept(np.array([1.0, 2.0]), 0) == [0, 1]


def _lower_index_first(scores, n_pruned: int) -> list[int]:
    """The documented rule written plainly: order by (score, index), drop the first n_pruned, keep the rest."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i))
    return sorted(order[n_pruned:])


def test_boundary_ties_prune_the_lower_index_first():
    """Many equal scores straddling the cut (arrays long enough that an unstable sort reorders them)."""
    rng = np.random.default_rng(0)
    for c in (17, 64, 100, 256, 512):
        for trial in range(4):
            scores = rng.integers(0, 3 + trial, size=c).astype(np.float64)  # few distinct values: ties everywhere
            for n in range(c):
                kept = select_kept(scores, n)
                assert kept == _lower_index_first(scores, n), (c, trial, n)
                assert kept == sorted(int(i) for i in np.argsort(scores, kind="stable")[n:])
    # through make_plan: a plan on the same scores keeps exactly the same set
    model = models.create("resnet_20")
    scores = {c: np.repeat([1.0, 0.0], model.get_submodule(c).out_channels // 2) for c in models.prunable_convs(model)}
    plan = make_plan(model, scores, "[0.3]*19", coupling="independent")
    for conv, s in scores.items():
        # every conv: the first half scores 1, the second 0; int(0.3 * C) zeros go, the lowest indices first
        assert plan.layers[conv] == _lower_index_first(s, int(0.3 * len(s))), conv
    assert plan.layers["layer3.0.conv1"] == list(range(32)) + list(range(32 + 19, 64))


@pytest.mark.parametrize("arch", ["vgg_16_bn", "resnet_56", "resnet_110", "densenet_40", "googlenet", "resnet_50"])
def test_official_boundary_ties_resolved_lower_index_first(arch, selection, reference_dir):
    """On HRank's own rank files (ties at the cut on many convs) every kept set is exactly the stable one."""
    model = models.create(arch)
    ties = 0
    for s in selection[arch]["strings"].values():
        scores = official_scores(reference_dir, arch, s["convs"])
        plan = make_plan(model, scores, s["compress_rate_string"], coupling="independent").layers
        for conv in s["convs"]:
            rank = scores[conv["module"]]
            n = int(conv["rate"] * conv["C"])
            expected = _lower_index_first(rank, n)
            assert expected == sorted(int(i) for i in np.argsort(rank, kind="stable")[n:])
            assert plan[conv["module"]] == expected, conv["module"]
            ties += conv["boundary_tie"]
    assert ties == sum(s["num_boundary_ties"] for s in selection[arch]["strings"].values())


def test_resnet56_groups_are_three_streams_and_lone_conv1s():
    groups = find_groups(models.create("resnet_56"))
    multi = [g for g in groups if len(g.members) > 1]
    assert [g.members[0] for g in multi] == ["conv1", "layer2.0.conv2", "layer3.0.conv2"]
    assert multi[0].members == ("conv1",) + tuple(f"layer1.{b}.conv2" for b in range(9))
    assert [g.channels for g in multi] == [16, 32, 64]
    assert all(len(g.members) == 10 if g.channels == 16 else len(g.members) == 9 for g in multi)
    singles = [g.members[0] for g in groups if len(g.members) == 1]
    assert singles == [f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(9)]
    assert all(g.prunable for g in groups)


@pytest.mark.parametrize("arch, n_groups, n_multi", [("vgg_16_bn", 13, 0), ("densenet_40", 39, 0),
                                                     ("googlenet", 64, 0), ("resnet_50", 37, 4)])
def test_groups_of_other_archs(arch, n_groups, n_multi):
    groups = find_groups(models.create(arch), SMALL_INPUT.get(arch))
    assert len(groups) == n_groups and sum(len(g.members) > 1 for g in groups) == n_multi
    if arch == "resnet_50":
        stream = next(g for g in groups if "layer2.0.downsample.0" in g.members)
        assert set(stream.members) == {"layer2.0.downsample.0"} | {f"layer2.{b}.conv3" for b in range(4)}


def test_mean_rule_on_resnet56_official_string(selection, reference_dir):
    s = selection["resnet_56"]["strings"]["current"]
    plan = make_plan(models.create("resnet_56"), official_scores(reference_dir, "resnet_56", s["convs"]),
                     s["compress_rate_string"])
    streams = {g.members[0]: g for g in plan.groups if len(g.members) > 1}
    # stem 0.1 + nine 0.6 -> 0.55; eight 0.6 + one 0.0 -> 0.5333; three 0.6 + six 0.4 -> 0.4667
    assert streams["conv1"].rate == pytest.approx(0.55) and streams["conv1"].width == 16 - 8
    assert streams["layer2.0.conv2"].rate == pytest.approx(4.8 / 9) and streams["layer2.0.conv2"].width == 32 - 17
    assert streams["layer3.0.conv2"].rate == pytest.approx(4.2 / 9) and streams["layer3.0.conv2"].width == 64 - 29
    layers = plan.layers
    assert layers["layer1.3.conv2"] == layers["conv1"] and layers["layer3.8.conv2"] == layers["layer3.0.conv2"]
    # the group's kept set comes from the mean of its members' scores
    scores = official_scores(reference_dir, "resnet_56", s["convs"])
    mean = np.mean([scores[m] for m in streams["conv1"].members], axis=0)
    assert layers["conv1"] == select_kept(mean, 8)
    wide = make_plan(models.create("resnet_56"), scores, s["compress_rate_string"], width_rule="max")
    assert next(g for g in wide.groups if g.members[0] == "conv1").width == 16 - int(0.6 * 16)


@pytest.mark.parametrize("arch", ["vgg_16_bn", "resnet_56", "resnet_110", "densenet_40", "googlenet", "resnet_50"])
def test_official_selection_reproduced(arch, selection, reference_dir):
    """Independent plans equal mask.py's kept sets on every conv; coupled plans on every uncoupled conv."""
    model = models.create(arch)
    groups = find_groups(model, SMALL_INPUT.get(arch))
    for sid, s in selection[arch]["strings"].items():
        scores = official_scores(reference_dir, arch, s["convs"])
        spec = Spec.from_string(model, s["compress_rate_string"])
        for conv in s["convs"]:
            assert spec.rates[conv["module"]] == conv["rate"], (sid, conv["module"])
        independent = make_plan(model, scores, spec, coupling="independent").layers
        coupled = make_plan(model, scores, spec, groups=groups, example_input=SMALL_INPUT.get(arch))
        alone = {g.members[0] for g in coupled.groups if len(g.members) == 1}
        checked = 0
        for conv in s["convs"]:
            check_official_kept(independent[conv["module"]], conv, scores[conv["module"]])
            if conv["module"] in alone:
                check_official_kept(coupled.layers[conv["module"]], conv, scores[conv["module"]])
                checked += 1
        assert checked == {"resnet_56": 27, "resnet_110": 54, "resnet_50": 33}.get(arch, len(s["convs"]))


@pytest.mark.parametrize("arch", ["vgg_16_bn", "resnet_56", "resnet_110", "densenet_40", "googlenet", "resnet_50"])
def test_hrank_rule_counts_reproduce_official(arch, selection, official_counts):
    model = models.create(arch)
    for sid, s in selection[arch]["strings"].items():
        ref = official_counts[arch]["strings"][sid]
        counts = hrank_rule_counts(model, Spec.from_string(model, s["compress_rate_string"]))
        if arch == "googlenet":  # the official counter reads c4's rate from entry 6; the masks use entry 5
            assert (counts["official_counter"].macs, counts["official_counter"].params) == (ref["flops"], ref["params"])
            masked = ref["variants"]["rates_as_applied_by_mask_py"]
            assert (counts["as_pruned"].macs, counts["as_pruned"].params) == (masked["flops"], masked["params"])
        else:
            assert "official_counter" not in counts
            assert (counts["as_pruned"].macs, counts["as_pruned"].params) == (ref["flops"], ref["params"]), sid


def test_published_numbers_at_display_precision():
    strings = {"resnet_56": ("[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]",
                             "62.72M", "0.49M"),
               "densenet_40": ("[0.0]+[0.1]*6+[0.7]*6+[0.0]+[0.1]*6+[0.7]*6+[0.0]+[0.1]*6+[0.7]*5+[0.0]",
                               "167.41M", "0.66M")}
    from hrank.flops import format_count

    for arch, (text, macs, params) in strings.items():
        c = hrank_rule_counts(models.create(arch), Spec.from_string(arch, text))["as_pruned"]
        assert (format_count(c.macs), format_count(c.params)) == (macs, params)


def test_plan_json_round_trip(tmp_path):
    model = models.create("resnet_20")
    rng = np.random.default_rng(0)
    scores = {n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = make_plan(model, scores, "[0.2]+[0.5]*18", criterion="random")
    path = plan.save(tmp_path / "plan.json")
    data = json.loads(path.read_text())
    assert data["format"] == "hrank.plan" and data["arch"] == "resnet_20" and data["criterion"] == "random"
    assert data["layers"]["layer1.0.conv1"] == plan.layers["layer1.0.conv1"]
    assert {"members", "rate", "width", "kept", "channels"} <= set(data["groups"][0])
    again = Plan.load(path)
    assert again.to_json() == plan.to_json()
    assert Spec.from_json(again.spec).to_hrank_string() == "[0.2]+[0.5]*18"
    # deterministic: the same inputs give the same plan, byte for byte
    assert json.dumps(make_plan(model, scores, "[0.2]+[0.5]*18", criterion="random").to_json()) == \
        json.dumps(plan.to_json())


def test_plan_errors_are_one_line(tmp_path):
    model = models.create("resnet_20")
    good = {n: np.ones(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    cases = [
        ({**good, "layer4.0.conv1": np.ones(8)}, "[0.5]*19", "scores name layer 'layer4.0.conv1'"),
        ({**good, "conv1": np.ones(32)}, "[0.5]*19", "32 values but the conv has 16"),
        ({**good, "conv1": np.full(16, np.nan)}, "[0.5]*19", "NaN"),
        ({}, "[0.5]*19", "no scores for"),
    ]
    for scores, spec, fragment in cases:
        with pytest.raises(HRankError) as e:
            make_plan(model, scores, spec)
        assert fragment in str(e.value) and "\n" not in str(e.value)

    class FakeRanks:
        scores = good
        fingerprint = "abc"
        arch = "resnet_56"

    with pytest.raises(HRankError, match="ranks are for resnet_56, but the model is resnet_20"):
        make_plan(model, FakeRanks(), "[0.5]*19")
    FakeRanks.arch = "resnet_20"
    assert make_plan(model, FakeRanks(), "[0.5]*19").scores_fingerprint == "abc"
    with pytest.raises(HRankError, match="not an hrank plan"):
        Plan.from_json({"format": "something"})
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(HRankError, match="cannot read plan"):
        Plan.load(tmp_path / "p.json")


def test_unprunable_groups_are_refused_with_reason():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))  # the last conv is the output
    x = torch.zeros(1, 3, 8, 8)
    groups = {g.members[0]: g for g in find_groups(net, x)}
    assert groups["0"].prunable and not groups["2"].prunable and "output" in groups["2"].reason
    scores = {"0": np.arange(8.0), "2": np.arange(4.0)}
    plan = make_plan(net, scores, {"0": 0.5}, example_input=x)
    assert plan.layers == {"0": [4, 5, 6, 7]}
    with pytest.raises(HRankError, match="cannot prune group 2: its channels are an output"):
        make_plan(net, scores, {"2": 0.5}, example_input=x)


class PadShortcutNet(nn.Module):
    """An option-A ResNet block written with F.pad on channels: the tracer cannot see the width change."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = F.relu(self.conv2(F.relu(self.conv1(x))) + short)
        return self.fc(x.mean((2, 3)))


def test_channel_pad_lambda_shortcut_is_caught():
    x = torch.zeros(1, 3, 16, 16)
    net = PadShortcutNet()
    merged = [g for g in find_groups(net, x) if "stem" in g.members]
    assert merged and not merged[0].prunable and "ChannelPadShortcut" in merged[0].reason
    scores = {n: np.arange(float(m.out_channels)) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    with pytest.raises(HRankError, match="ChannelPadShortcut"):
        make_plan(net, scores, {"stem": 0.5}, example_input=x)
    # convs outside the merged group still prune
    assert make_plan(net, scores, {"conv1": 0.5}, example_input=x).layers["conv1"] == list(range(8, 16))


def test_example_input_needed_outside_registry():
    with pytest.raises(HRankError, match="example_input"):
        find_groups(nn.Sequential(nn.Conv2d(3, 4, 3)))
