"""``hrank prune`` and ``hrank info`` on a pruned model: files, report, and one-line errors that write nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hrank
import hrank.flops
import hrank.plan
from hrank import models
from hrank.cli import main
from hrank.ranks import Ranks, model_fingerprint
from tests.helpers import hand_macs

R56 = "[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]"


def _ranks_file(path: Path, arch: str, seed: int = 0) -> Path:
    model = models.create(arch)
    rng = np.random.default_rng(seed)
    scores = {c: rng.random(model.get_submodule(c).out_channels) for c in models.prunable_convs(model)}
    Ranks(scores, 64, fingerprint=model_fingerprint(model), arch=arch).save(path)
    return path


@pytest.fixture
def r20(tmp_path):
    """A resnet_20 checkpoint (random weights) and a ranks file for it."""
    torch.manual_seed(0)
    ckpt = tmp_path / "base.pt"
    torch.save({"state_dict": models.create("resnet_20").state_dict()}, ckpt)
    return ckpt, _ranks_file(tmp_path / "ranks.npz", "resnet_20")


def test_prune_cli_physical_with_data(tmp_path, r20, tiny_cifar, capsys):
    ckpt, ranks = r20
    out = tmp_path / "pruned"
    code = main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--ranks", str(ranks),
                 "--compress-rate", "[0.1]+[0.5]*18", "--rates", "layer3.*.conv1=0.25", "--data-dir",
                 str(tiny_cifar), "--no-download", "--calib-images", "40", "--batch-size", "16", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    # resnet_20 by hand: stem 3*16*9*32*32, six 16->16 convs at 32x32, then per stage one strided conv
    # (cin -> 2 cin at half size) and five 2cin -> 2cin convs, and the 64 -> 10 linear
    dense = (9 * 3 * 16 * 32 * 32 + 6 * 9 * 16 * 16 * 32 * 32 + 9 * 16 * 32 * 16 * 16 + 5 * 9 * 32 * 32 * 16 * 16
             + 9 * 32 * 64 * 8 * 8 + 5 * 9 * 64 * 64 * 8 * 8 + 64 * 10)
    assert dense == hand_macs(models.create("resnet_20")) == 40_551_040
    assert "layer3.2.conv1" in text and f"before: {dense / 1e6:.2f}M MACs" in text and "[real network]" in text
    assert "accuracy: dense" in text and "after BN recalibration on 40 images" in text
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "plan.json", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["macs"] < summary["before"]["macs"] and summary["accuracy"]["calibration_images"] == 40
    widths = {row["layer"]: row["kept"] for row in summary["layers"]}
    assert widths["layer3.0.conv1"] == 64 - 16 and widths["layer1.0.conv1"] == 8
    plan = json.loads((out / "plan.json").read_text())
    assert plan["arch"] == "resnet_20" and plan["spec"]["source"]["rates"] == {"layer3.*.conv1": 0.25}
    model, meta = hrank.load(out / "model.pt")
    assert meta["mode"] == "physical" and model.layer3[0].conv1.out_channels == 48
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)

    assert main(["info", "--model", str(out)]) == 0
    info = capsys.readouterr().out
    assert "kept/of" in info and "48/64" in info and "mode physical" in info and "groups pruned" in info


def test_prune_cli_official_ranks_and_hrank_rule(tmp_path, reference_dir, capsys):
    out = tmp_path / "r56"
    code = main(["prune", "--model", "resnet_56", "--ranks", str(reference_dir / "official_ranks" / "resnet_56"),
                 "--compress-rate", R56, "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "HRank's counting rule (output channels only): 62.72M MACs, 0.49M params" in text
    # the real, physically pruned network (mean width rule), its MACs counted here from the layer shapes
    pruned, _ = hrank.load(out / "model.pt")
    macs = hand_macs(pruned)
    assert f"after:  {macs / 1e6:.2f}M MACs" in text
    # stream widths 16-8, 32-17, 64-29 (test_plan's mean rule) and the inner convs' int(rate * C): the same count
    widths = {name: m.out_channels for name, m in pruned.named_modules() if isinstance(m, nn.Conv2d)}
    assert (widths["conv1"], widths["layer2.0.conv2"], widths["layer3.0.conv2"]) == (8, 15, 35)
    assert json.loads((out / "summary.json").read_text())["after"]["macs"] == macs


def test_prune_cli_mask_independent_and_plan_reuse(tmp_path, r20, capsys):
    ckpt, ranks = r20
    out = tmp_path / "masked"
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--ranks", str(ranks),
                 "--compress-rate", "[0.5]*19", "--mode", "mask", "--independent", "--out", str(out)]) == 0
    assert "shapes and speed unchanged" in capsys.readouterr().out
    model, meta = hrank.load(out / "model.pt")
    assert meta["mode"] == "mask" and meta["plan"].coupling == "independent"
    assert model.layer1[0].conv1.weight.shape == (16, 16, 3, 3)
    assert int((model.layer1[0].conv1.weight.abs().sum((1, 2, 3)) == 0).sum()) == 8
    # the same plan applied again (physically this time) from the plan file
    out2 = tmp_path / "again"
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--plan", str(out / "plan.json"),
                 "--mode", "mask", "--out", str(out2)]) == 0
    m2, _ = hrank.load(out2 / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values(), strict=True))


def test_prune_cli_l1_criterion_without_ranks(tmp_path, r20, capsys):
    ckpt, _ = r20
    out = tmp_path / "l1"
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--criterion", "l1",
                 "--rates", "layer*.conv1=0.5", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["criterion"] == "l1" and len(plan["layers"]["layer2.1.conv1"]) == 16
    assert "layer1.0.conv2" not in plan["layers"]  # not named by the rates: untouched


def test_prune_cli_budget_target(tmp_path, r20, capsys):
    ckpt, ranks = r20
    out = tmp_path / "half"
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--ranks", str(ranks),
                 "--target-macs", "0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "budget:" in printed and "rates: [" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert abs(summary["after"]["macs"] / summary["before"]["macs"] - 0.5) <= 0.005
    assert summary["budget"]["round_to"] == 8
    assert all(layer["kept"] % 8 == 0 for layer in summary["layers"])
    model, _ = hrank.load(out / "model.pt")  # the saved model is the budgeted one
    assert hrank.flops.count(model).macs == summary["after"]["macs"]


def test_prune_cli_capacity_order(tmp_path, r20, capsys):
    # the order reaches the search and is recorded: stage 1 (few params per MAC) loses more than stage 3
    ckpt, ranks = r20
    out = tmp_path / "cap"
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--ranks", str(ranks),
                 "--target-macs", "0.5", "--budget-order", "capacity", "--round-to", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["budget"]["order"] == "capacity" and summary["budget"]["round_to"] == 1
    assert abs(summary["after"]["macs"] / summary["before"]["macs"] - 0.5) <= 0.005
    rates = summary["budget"]["rates"]
    assert rates["layer1.0.conv1"] > rates["layer2.0.conv1"] > rates["layer3.0.conv1"] > 0


def test_prune_cli_force_replaces(tmp_path, r20, capsys):
    ckpt, ranks = r20
    out = tmp_path / "o"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    args = ["prune", "--model", "resnet_20", "--ranks", str(ranks), "--compress-rate", "[0.2]*19", "--out", str(out)]
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err and (out / "stale.txt").exists()
    assert main(args + ["--force"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "plan.json", "summary.json"]


def _bad_inputs(tmp_path: Path, r20) -> list[tuple[list[str], str]]:
    ckpt, ranks = r20
    r56_ranks = _ranks_file(tmp_path / "r56.npz", "resnet_56")
    torch.save(models.create("resnet_32").state_dict(), tmp_path / "r32.pt")
    wrong_plan = tmp_path / "plan32.json"
    model = models.create("resnet_32")
    scores = {n: np.ones(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    hrank.plan.make_plan(model, scores, "[0.5]*31").save(wrong_plan)
    base = ["prune", "--model", "resnet_20", "--out", str(tmp_path / "never")]
    return [
        (base + ["--ranks", str(r56_ranks), "--compress-rate", "[0.5]*19"], "ranks are for resnet_56"),
        (base + ["--checkpoint", str(tmp_path / "r32.pt"), "--ranks", str(ranks), "--compress-rate", "[0.5]*19"],
         "checkpoint does not fit resnet_20"),
        (base + ["--ranks", str(ranks), "--compress-rate", "[0.5]*18"], "expects 19"),
        (base + ["--ranks", str(ranks), "--compress-rate", "[0.5]*18+[1.0]"], "would remove all"),
        (base + ["--ranks", str(ranks), "--compress-rate", "[0.5]*19+"], "syntax error at column 10"),
        (base + ["--ranks", str(ranks), "--rates", "layer9.*=0.5"], "matches no Conv2d"),
        (base + ["--plan", str(wrong_plan)], "plan is for resnet_32"),
        (base + ["--ranks", str(ranks), "--compress-rate", "[0.5]*19", "--independent"], "only valid with --mode mask"),
        (base + ["--checkpoint", str(ckpt), "--compress-rate", "[0.5]*19"], "--ranks is required"),
        (base + ["--checkpoint", str(tmp_path / "missing.pt"), "--ranks", str(ranks), "--compress-rate", "[0.5]*19"],
         "checkpoint not found"),
        (base + ["--ranks", str(ranks), "--target-macs", "0.5", "--compress-rate", "[0.5]*19"], "give one way"),
        (base + ["--ranks", str(ranks), "--target-macs", "0.5", "--target-params", "0.5"], "give one of"),
        (base + ["--ranks", str(ranks), "--target-macs", "0.001"], "cannot be met"),
        (base + ["--ranks", str(ranks), "--target-macs", "0.5", "--round-to", "0"], "round_to must be a positive"),
    ]


def test_prune_cli_bad_input_is_one_line_and_writes_nothing(tmp_path, r20, capsys):
    for args, fragment in _bad_inputs(tmp_path, r20):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("hrank: error:") and "\n" not in err and fragment in err, (fragment, err)
        assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]  # no temp dirs left behind


def test_prune_cli_refuses_an_already_pruned_checkpoint(tmp_path, r20, capsys):
    ckpt, ranks = r20
    out = tmp_path / "p"
    assert main(["prune", "--model", "resnet_20", "--ranks", str(ranks), "--compress-rate", "[0.5]*19",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(out / "model.pt"), "--ranks", str(ranks),
                 "--compress-rate", "[0.5]*19", "--out", str(tmp_path / "q")]) == 2
    assert "already pruned" in capsys.readouterr().err


def test_prune_cli_ignore_and_skipped_report(tmp_path, r20, capsys):
    ckpt, ranks = r20
    out = tmp_path / "pruned"
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--ranks", str(ranks),
                 "--rates", "*=0.5", "--ignore", "layer3.*", "--out", str(out)]) == 0
    plan = json.loads((out / "plan.json").read_text())
    widths = {m: g["width"] for g in plan["groups"] for m in g["members"]}
    assert widths["layer2.0.conv1"] == 16 and "layer3.0.conv1" not in widths
    assert plan["spec"]["ignored"] and all(c.startswith("layer3.") for c in plan["spec"]["ignored"])
    assert main(["prune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--ranks", str(ranks),
                 "--rates", "layer2.0.conv2=0.5", "--ignore", "layer2.1.conv2", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "coupled with ignored layer2.1.conv2" in err[0]
    assert not (tmp_path / "x").exists()
