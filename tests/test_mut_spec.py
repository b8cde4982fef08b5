"""Mutation-killing tests for hrank.spec (bench/mutation.py, docs/mutation.md): exact layer names that look
like glob patterns, rates that are not numbers, the model's own entry bound and the forced-zero notes."""

from __future__ import annotations

import pytest
from torch import nn

from hrank.errors import HRankError
from hrank.spec import Spec


class Bracketed(nn.Module):
    """Conv names holding glob metacharacters: an exact name must match itself, not what fnmatch reads in it."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module("conv[1]", nn.Conv2d(3, 8, 3))
        self.add_module("conv1", nn.Conv2d(8, 8, 3))


def test_exact_name_is_not_read_as_a_pattern():
    model = Bracketed()
    spec = Spec.from_mapping(model, {"conv[1]": 0.5})
    assert spec.rates == {"conv[1]": 0.5}  # fnmatch would read [1] as a class and match "conv1" instead
    assert spec.exact == frozenset({"conv[1]"})
    assert Spec.from_mapping(model, {"conv?1?": 0.25}).rates == {"conv[1]": 0.25}
    assert Spec.from_mapping(model, {"conv*": 0.25}).rates == {"conv[1]": 0.25, "conv1": 0.25}
    assert Spec.from_mapping(model, {"conv1": 0.5}).without(model, ["conv[1]"]).ignored == frozenset({"conv[1]"})


@pytest.mark.parametrize("rate", ["0.5", True, False, None, [0.5], b"0.5"])
def test_rates_that_are_not_numbers_are_refused(rate):
    with pytest.raises(HRankError, match="is not a number"):
        Spec.from_mapping("resnet_20", {"layer1.0.conv1": rate})


def test_int_rates_are_numbers():
    assert Spec.from_mapping("resnet_20", {"layer1.0.conv1": 0}).rates == {"layer1.0.conv1": 0.0}


def test_string_longer_than_the_model_is_bounded_by_its_entry_count():
    with pytest.raises(HRankError, match="the model has 55 rate entries"):
        Spec.from_string("resnet_56", "[0.1]*56")
    with pytest.raises(HRankError, match="expects 55"):
        Spec.from_string("resnet_56", "[0.1]*54")


def test_forced_zero_note_names_the_entry_only_when_it_was_not_zero():
    base = "[0.5]*12+[{}]"
    zero = Spec.from_string("vgg_16_bn", base.format("0.0"))
    assert zero.notes == () and zero.rates["features.conv16"] == 0.0
    one = Spec.from_string("vgg_16_bn", base.format("0.3"))
    assert one.notes == ("entry 13 (features.conv16) is forced to 0 as in the official code (was 0.3)",)
    assert one.rates["features.conv16"] == 0.0 and one.rates["features.conv15"] == 0.5


def test_rate_errors_name_the_entry_and_conv():
    with pytest.raises(HRankError, match=r"rate 1\.0 at entry 19 \(layer3\.2\.conv2\) would remove all 64"):
        Spec.from_string("resnet_20", "[0.1]*18+[1.0]")
    with pytest.raises(HRankError, match=r"rate 1\.5 at entry 2 \(layer1\.0\.conv1\) is outside"):
        Spec.from_string("resnet_20", "[0.1]+[1.5]+[0.1]*17")


def test_string_spec_names_every_conv_exactly():
    spec = Spec.from_string("resnet_20", "[0.1]*19")
    assert spec.exact == frozenset(spec.rates) and len(spec.rates) == 19


def test_parser_lists_commas_and_bounds():
    from hrank.spec import parse_rates

    assert parse_rates("[0.5,1]") == [0.5, 1.0]
    assert parse_rates("[0.1,10, 2]") == [0.1, 10.0, 2.0]
    assert parse_rates("[0.1, 0.2]", max_entries=2) == [0.1, 0.2]  # exactly the bound is accepted
    with pytest.raises(HRankError, match="more than 2 entries .from column 2"):
        parse_rates("[0.1, 0.2, 0.3]", max_entries=2)
    assert parse_rates("[0.1]*0000000000002") == [0.1, 0.1]  # leading zeros are not digits that count
    assert parse_rates("[0.1]*0") == []
    with pytest.raises(HRankError, match="more than 10 entries"):
        parse_rates("[0.1]*1234567", max_entries=10)  # clipped above the bound, never below it
    with pytest.raises(HRankError, match="more than 10 entries"):
        parse_rates("[0.1]*11", max_entries=10)
    for text in ("[0.1]*2e3", "[0.1]*2E3", "[0.1]*2.5"):
        with pytest.raises(HRankError, match="repeat count must be a whole number"):
            parse_rates(text)
    with pytest.raises(HRankError, match=r"expected '\+' or the end"):
        parse_rates("[0.1]*2X")
