"""Compress-rate specs: the HRank list parser, official entry order and quirks, pattern maps, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hrank import models
from hrank.errors import HRankError
from hrank.plan import find_groups, make_plan
from hrank.spec import Spec, encode_rates, num_pruned, parse_mapping_string, parse_rates

OFFICIAL_COUNTS = {"vgg_16_bn": 13, "resnet_56": 55, "resnet_110": 109, "densenet_40": 39, "googlenet": 10,
                   "resnet_50": 53, "resnet_20": 19, "resnet_32": 31, "resnet_44": 43}


@pytest.fixture(scope="module")
def selection(reference_dir):
    return json.loads((reference_dir / "official_selection.json").read_text())


def test_parse_basic_forms():
    assert parse_rates("[0.1]+[0.60]*3+[0.0]*2") == [0.1, 0.6, 0.6, 0.6, 0.0, 0.0]
    assert parse_rates(" [ 0.1 , 0.2 ] * 2 + 2*[0.5] ") == [0.1, 0.2, 0.1, 0.2, 0.5, 0.5]
    assert parse_rates("[1e-1]*2*3") == [0.1] * 6
    assert parse_rates("[.5]") == [0.5]
    assert parse_rates("[0.1]*0+[0.2]") == [0.2]


def test_parse_equals_python_on_official_strings(selection):
    for arch, data in selection.items():
        for sid, s in data["strings"].items():
            assert parse_rates(s["compress_rate_string"]) == s["compress_rate"], (arch, sid)


@pytest.mark.parametrize("text, column, fragment", [
    ("[0.1]+[0.6]x3", 12, "expected '+' or the end"),
    ("[0.1*2]", 5, "expected ']'"),
    ("[0.1]+", 7, "expected '['"),
    ("[0.1]*2.5", 7, "whole number"),
    ("[abc]", 2, "expected a number"),
    ("", 1, "empty compress_rate"),
    ("[0.1]+[0.2", 11, "expected ']'"),
    ("__import__('os')", 1, "expected '['"),
])
def test_parse_errors_name_the_column(text, column, fragment):
    with pytest.raises(HRankError) as e:
        parse_rates(text)
    msg = str(e.value)
    assert "\n" not in msg and f"column {column}:" in msg and fragment in msg


@given(st.lists(st.tuples(st.lists(st.floats(0, 0.99, allow_nan=False), min_size=1, max_size=3),
                          st.integers(0, 5)), min_size=1, max_size=6))
def test_parse_matches_list_semantics(terms):
    text = "+".join("[" + ", ".join(repr(v) for v in values) + f"]*{n}" for values, n in terms)
    expected = [v for values, n in terms for v in values * n]
    assert parse_rates(text) == expected


@pytest.mark.parametrize("arch", sorted(OFFICIAL_COUNTS))
def test_entry_counts_and_length_error(arch):
    n = OFFICIAL_COUNTS[arch]
    assert len(models.rate_entries(arch)) == n
    spec = Spec.from_string(arch, f"[0.0]*{n}")
    assert set(spec.rates) == set(models.prunable_convs(arch))
    with pytest.raises(HRankError) as e:
        Spec.from_string(arch, f"[0.0]*{n - 1}")
    msg = str(e.value)
    assert "\n" not in msg and f"{n - 1} entries" in msg and f"expects {n}" in msg
    assert f"hrank info --model {arch}" in msg


def test_resnet56_official_string_maps_in_hrank_order(selection):
    text = selection["resnet_56"]["strings"]["current"]["compress_rate_string"]
    spec = Spec.from_string("resnet_56", text)
    assert spec.rates["conv1"] == 0.1
    assert spec.rates["layer1.0.conv1"] == 0.6 and spec.rates["layer2.8.conv1"] == 0.6
    assert spec.rates["layer2.8.conv2"] == 0.0 and spec.rates["layer3.0.conv1"] == 0.0
    assert spec.rates["layer3.5.conv1"] == 0.1 and spec.rates["layer3.8.conv2"] == 0.4
    # every conv gets exactly the rate mask.py applied
    for conv in selection["resnet_56"]["strings"]["current"]["convs"]:
        assert spec.rates[conv["module"]] == conv["rate"]
    # written back folded: the trailing alternation of 0.1 and 0.4 becomes one repeated pattern
    assert spec.to_hrank_string() == "[0.1]+[0.6]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1, 0.4]*4"
    assert parse_rates(spec.to_hrank_string()) == parse_rates(text)


def test_googlenet_entry_five_prunes_c4_like_mask_py(selection):
    s = selection["googlenet"]["strings"]["current"]
    spec = Spec.from_string("googlenet", s["compress_rate_string"])
    for conv in s["convs"]:
        assert spec.rates[conv["module"]] == conv["rate"], conv["module"]
    model = models.create("googlenet")
    counted = spec.official_counter_pruned(model)
    assert counted["inception_c4.branch1x1.0"] == int(0.85 * 128)  # the counter reads entry 6
    assert spec.pruned_filters(model)["inception_c4.branch1x1.0"] == int(0.8 * 128)


def test_vgg_thirteenth_entry_forced_to_zero():
    spec = Spec.from_string("vgg_16_bn", "[0.95]+[0.5]*6+[0.9]*4+[0.8]*2")
    assert spec.rates["features.conv16"] == 0.0 and spec.rates["features.conv15"] == 0.8
    assert any("forced to 0" in n for n in spec.notes)


def test_rate_range_and_emptying_errors():
    with pytest.raises(HRankError, match=r"outside \[0, 1\)"):
        Spec.from_string("resnet_20", "[0.1]*18+[1.5]")
    with pytest.raises(HRankError, match=r"outside \[0, 1\)"):
        Spec.from_string("resnet_20", "[-0.1]+[0.1]*18")
    with pytest.raises(HRankError, match="would remove all 64 filters of layer3.2.conv2"):
        Spec.from_string("resnet_20", "[0.1]*18+[1.0]")
    with pytest.raises(HRankError, match="would remove all"):
        Spec.from_mapping("resnet_20", {"layer1.0.conv1": 1})


def test_mapping_with_patterns_and_overrides():
    model = models.create("resnet_20")
    spec = Spec.from_mapping(model, {"layer1.*.conv1": 0.5, "layer2.*": 0.3, "layer2.0.conv1": 0.1})
    assert spec.rates["layer1.2.conv1"] == 0.5 and "layer1.0.conv2" not in spec.rates
    assert spec.rates["layer2.1.conv2"] == 0.3 and spec.rates["layer2.0.conv1"] == 0.1  # later items win
    base = Spec.from_string(model, "[0.2]*19")
    over = Spec.from_mapping(model, parse_mapping_string("layer3.*.conv1=0.6"), base=base)
    assert over.rates["layer3.0.conv1"] == 0.6 and over.rates["layer3.0.conv2"] == 0.2
    assert over.source["compress_rate"] == "[0.2]*19" and over.source["rates"] == {"layer3.*.conv1": 0.6}
    with pytest.raises(HRankError, match="pattern 'layer9.*' matches no Conv2d"):
        Spec.from_mapping(model, {"layer9.*": 0.5})
    with pytest.raises(HRankError, match="layer name 'layer1.0.conv9' matches no Conv2d"):
        Spec.from_mapping(model, {"layer1.0.conv9": 0.5})


def test_mapping_string_errors():
    assert parse_mapping_string("a=0.5, b.*=0.25") == {"a": 0.5, "b.*": 0.25}
    with pytest.raises(HRankError, match="PATTERN=RATE"):
        parse_mapping_string("layer1.*.conv1")
    with pytest.raises(HRankError, match="not a number"):
        parse_mapping_string("layer1=abc")


def test_rates_files_yaml_and_json(tmp_path):
    (tmp_path / "r.yaml").write_text("layer1.*.conv1: 0.5\nlayer3.*: 0.25\n")
    spec = Spec.from_file("resnet_20", tmp_path / "r.yaml")
    assert spec.rates["layer1.1.conv1"] == 0.5 and spec.rates["layer3.2.conv2"] == 0.25
    (tmp_path / "r.json").write_text(json.dumps({"compress_rate": "[0.1]*19", "rates": {"conv1": 0.0}}))
    spec = Spec.from_file("resnet_20", tmp_path / "r.json")
    assert spec.rates["conv1"] == 0.0 and spec.rates["layer2.0.conv2"] == 0.1
    (tmp_path / "bad.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(HRankError, match="must hold a mapping"):
        Spec.from_file("resnet_20", tmp_path / "bad.yaml")


def test_spec_json_round_trip():
    spec = Spec.from_string("resnet_20", "[0.1]+[0.5]*18")
    again = Spec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again.rates == spec.rates and again.to_hrank_string() == "[0.1]+[0.5]*18"


def test_string_needs_a_registered_model():
    from torch import nn

    with pytest.raises(HRankError, match="registered model"):
        Spec.from_string(nn.Sequential(nn.Conv2d(3, 4, 3)), "[0.5]")
    spec = Spec.from_mapping(nn.Sequential(nn.Conv2d(3, 4, 3)), {"0": 0.5})
    assert spec.rates == {"0": 0.5} and spec.order is None


@given(st.lists(st.sampled_from([0.0, 0.1, 0.5, 0.63]), min_size=1, max_size=60))
def test_encoded_rates_parse_back(rates):
    text = encode_rates(rates)
    assert parse_rates(text) == rates
    assert len(text) <= len("+".join(f"[{r!r}]" for r in rates))  # never longer than one list per entry


def test_encoded_rates_fold_alternating_patterns():
    # a ResNet budget alternates stream and inner-conv entries: folded, not 55 terms
    rates = [0.0, 0.5] * 18 + [0.0, 0.63] + [0.0, 0.5] * 8 + [0.0]
    assert encode_rates(rates) == "[0.0, 0.5]*18+[0.0, 0.63]+[0.0, 0.5]*8+[0.0]"
    assert encode_rates([0.1] + [0.6] * 35 + [0.0] * 2) == "[0.1]+[0.6]*35+[0.0]*2"


# --------------------------------------------------------------------------------------------------
# HRank's rule: int(rate * C) filters go, in float arithmetic (no epsilon, no rounding)
# --------------------------------------------------------------------------------------------------

RULE_WIDTHS = (16, 32, 64, 100, 128, 256, 512)
# the official strings' rates (and HRankPlus-style ones) plus the whole k/100 scan
OFFICIAL_RATES = (0.0, 0.05, 0.1, 0.2, 0.21, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)
SCAN_RATES = tuple(sorted(set(OFFICIAL_RATES) | {k / 100 for k in range(100)}))


class _RuleNet(nn.Module):
    """A plain chain of convs with the widths of RULE_WIDTHS, so every rate meets every width."""

    def __init__(self) -> None:
        super().__init__()
        layers, cin = [], 3
        for c in RULE_WIDTHS:
            layers += [nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def test_num_pruned_is_int_of_the_float_product():
    """0.29 * 100 is 28.999999999999996 in binary floating point: HRank (and hrank) prune 28, not 29."""
    assert 0.29 * 100 < 29 and 0.57 * 100 < 57 and 0.58 * 100 < 58  # the float facts the rule rests on
    assert num_pruned(0.29, 100) == 28 and num_pruned(0.57, 100) == 56 and num_pruned(0.58, 100) == 57
    assert num_pruned(0.07, 100) == 7 and num_pruned(0.3, 16) == 4 and num_pruned(0.6, 16) == 9
    below = []  # (rate, C) whose float product lies a hair below an integer: the cases an epsilon would flip
    for c in sorted(set(RULE_WIDTHS) | set(range(1, 1025))):
        for r in SCAN_RATES:
            expected = int(r * c)  # the official code's expression, Python floats
            assert num_pruned(r, c) == expected, (r, c)
            if r * c < round(r * c) and round(r * c) - r * c < 1e-9:
                below.append((r, c))
                assert expected == round(r * c) - 1
    assert [b for b in below if b[1] == 100] == [(0.29, 100), (0.57, 100), (0.58, 100)]
    assert len(below) >= 40 and (0.7, 90) in below  # 0.7 * 90 = 62.99999999999999 -> 62
    assert num_pruned(0.7, 90) == 62 and num_pruned(0.58, 50) == 28


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_int_rate_times_c_through_spec_and_plan_widths():
    model = _RuleNet().eval()
    x = torch.zeros(1, 3, 4, 4)
    groups = find_groups(model, x)
    convs = [f"features.{3 * i}" for i in range(len(RULE_WIDTHS))]
    rng = np.random.default_rng(0)
    scores = {conv: rng.random(c) for conv, c in zip(convs, RULE_WIDTHS, strict=True)}
    for r in SCAN_RATES:
        spec = Spec.from_mapping(model, {"*": r})
        expected = {conv: int(r * c) for conv, c in zip(convs, RULE_WIDTHS, strict=True)}
        assert spec.pruned_filters(model) == expected, r
        plan = make_plan(model, scores, spec, groups=groups, example_input=x)
        widths = {conv: len(kept) for conv, kept in plan.layers.items()}
        assert widths == {conv: c - int(r * c) for conv, c in zip(convs, RULE_WIDTHS, strict=True)}, r
    # the registry path: HRank strings on VGG-16 (64 ... 512 filters) and ResNet-56 (16, 32, 64)
    vgg = models.create("vgg_16_bn")
    for r in (0.29, 0.57, 0.58, 0.95):
        spec = Spec.from_string(vgg, f"[{r}]*12+[0.0]")
        channels = {c: vgg.get_submodule(c).out_channels for c in spec.rates}
        assert spec.pruned_filters(vgg) == {c: int(spec.rates[c] * n) for c, n in channels.items()}
        assert spec.pruned_filters(vgg)["features.conv0"] == int(r * 64)
