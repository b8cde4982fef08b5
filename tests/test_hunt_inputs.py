"""Careless and hostile command-line input an audit found failing raw or lying: non-UTF-8 configs, numbers in
YAML's exponent form, dangling output links, line breaks in messages, unsupported devices, superscript digits
in rate strings, models that cannot take the images, values past what a number type holds."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from torch import nn

from hrank import config, flops, models, recipes
from hrank.cli import main
from hrank.cli.common import NONNEG_INT, NUM_CLASSES
from hrank.cli.prune import _move_into_place
from hrank.distributed import resolve_device
from hrank.errors import HRankError
from hrank.io import check_output, load_yaml_mapping
from hrank.spec import Spec
from hrank.train import evaluate


def test_a_config_that_is_not_utf8_is_one_line(tmp_path: Path):
    path = tmp_path / "run.yaml"
    path.write_bytes("# caf\xe9\nmodel: resnet_20\n".encode("latin-1"))
    with pytest.raises(HRankError, match="is not UTF-8 text"):
        load_yaml_mapping(path)


@pytest.mark.parametrize("text, value", [("5e-1", 0.5), ("1E-3", 1e-3), ("+2.5e+0", 2.5), (".5", 0.5)])
def test_numbers_in_exponent_form_are_numbers(text, value):
    assert config.check_value("max_rate", text) == value
    assert recipes.apply_overrides(recipes.get_preset("fast"), {"lr": text}).lr == value


@pytest.mark.parametrize("text", ["1e-3x", "five", "1e", "0x10", "1\u00b2"])
def test_text_that_is_not_a_plain_number_stays_refused(text):
    with pytest.raises(HRankError, match="must be"):
        config.check_value("max_rate", text)
    with pytest.raises(HRankError, match="must be a number"):
        recipes.apply_overrides(recipes.get_preset("fast"), {"lr": text})


def test_a_dangling_link_at_the_output_is_not_replaced_without_force(tmp_path: Path):
    link = tmp_path / "scores.npz"
    link.symlink_to(tmp_path / "nowhere" / "target.npz")
    with pytest.raises(HRankError, match="symbolic link to nothing"):
        check_output(link)
    assert link.is_symlink()
    assert check_output(link, force=True) == link


def test_a_line_break_in_a_message_stays_on_one_line(capsys):
    assert main(["info", "--model", "nope\nhrank: fake line"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("hrank: error: ") and "nope\\nhrank: fake line" in err


@pytest.mark.parametrize("name", ["meta", "mps", "xpu"])
def test_devices_hrank_does_not_run_on_are_refused(name):
    with pytest.raises(HRankError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


@pytest.mark.parametrize("text", ["[0.25]*1\u00b2", "[0.2\u2075]*19", "[0.25]*\u0661\u0669"])
def test_rate_strings_take_ascii_digits_only(text):
    model = models.create("resnet_20")
    with pytest.raises(HRankError):
        Spec.from_string(model, text)


def test_prune_can_replace_the_current_directory(tmp_path: Path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "plan.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "out")
    _move_into_place(tmp_path / "new", Path("."), force=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["plan.json"]


class _Gray(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_a_model_that_cannot_take_the_images_is_one_line():
    batches = [(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))]
    with pytest.raises(HRankError, match=r"model failed on images of shape \(2, 3, 8, 8\) \(RuntimeError"):
        evaluate(_Gray(), batches)
    deep = nn.Sequential(*[nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.MaxPool2d(2)) for _ in range(4)],
                         nn.Conv2d(3, 3, 3))
    with pytest.raises(HRankError, match=r"fails on an input of size \(3, 16, 16\)"):
        flops.count(deep, (3, 16, 16))


def test_values_past_what_the_number_types_hold_are_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="must be <="):
        NONNEG_INT("99999999999999999999999")  # --seed
    with pytest.raises(argparse.ArgumentTypeError, match="must be <= 1000000"):
        NUM_CLASSES("1000000000000")
    with pytest.raises(HRankError, match="num_classes must be at most"):
        models.create("resnet_20", num_classes=10**12)
    with pytest.raises(HRankError, match="'seed' must be < 2\\*\\*63"):
        config.resolve({"model": "resnet_20", "compress_rate": "[0.5]*19"}, {"seed": 1 << 64})
