"""`hrank run` end to end on an image folder (ImageNet layout), with a registry model, a user's
``module:factory`` model and ``torchvision:resnet18``. Needs torchvision (the CI's second venv runs it)."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

import hrank  # noqa: E402
from hrank import config, flops, models  # noqa: E402
from hrank.run import run  # noqa: E402
from tests.test_imagefolder import make_image_folder  # noqa: E402

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
CLASSES = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A few hundred real CIFAR-10 images written as PNG into class folders when ../shared has CIFAR-10
    (or HRANK_CIFAR10 points at it), synthetic images otherwise."""
    real = os.environ.get("HRANK_CIFAR10") or (str(SHARED_CIFAR) if SHARED_CIFAR.is_dir() else None)
    root = tmp_path_factory.mktemp("imgs") / "folder"
    return make_image_folder(root, 40, CLASSES, size=32, real_cifar_dir=real)


def _run(folder: Path, out: Path, model: str, checkpoint: Path, **extra) -> dict:
    cfg = {"model": model, "checkpoint": str(checkpoint), "dataset": "imagefolder", "data_dir": str(folder),
           "num_classes": CLASSES, "image_size": 32, "resize_size": 36, "workers": 0, "val_size": 16,
           "rank_images": 16, "rank_batch_size": 8, "recalibrate_images": 16, "target_macs": 0.6, "round_to": 1,
           "finetune": {"epochs": 1, "batch_size": 16}, "latency": False, "export": ["onnx"],
           "normalization": "imagenet", **extra}
    logs: list[str] = []
    summary = run(config.resolve(cfg, {}), out, progress=False, printer=logs.append)
    return {"summary": summary, "logs": logs}


def _save_init(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def _check_finished(out: Path, result: dict, size: int = 32) -> None:
    summary = result["summary"]
    base, final = summary["stages"][0], summary["stages"][-1]
    assert final["macs"] < base["macs"]
    assert 0 <= final["test_top1"] <= 100 and 0 <= final["test_top5"] <= 100
    assert final["test_top5"] >= final["test_top1"]
    ranks = json.loads((out / "spec.json").read_text())
    assert ranks["budget"]["achieved"] <= ranks["budget"]["target"] * 1.05
    assert json.loads((out / "export.json").read_text())["onnx"]["ok"]
    model, meta = hrank.load(out / "model.pt")  # rebuilt from the recorded reference, no builder
    assert flops.count(model, (3, size, size)).params == final["params"]  # conv + linear, as papers count
    assert meta["normalization"]["name"] == "imagenet"
    m = json.loads((out / "final.json").read_text())
    assert m["test_top1"] == final["test_top1"]
    # the report says top-5 for image folders
    assert "top-5" in (out / "report.md").read_text()


@pytest.mark.slow
def test_registry_model_on_an_image_folder(folder: Path, tmp_path: Path):
    torch.manual_seed(0)
    ckpt = _save_init(models.create("resnet_20", num_classes=CLASSES), tmp_path / "r20.pt")
    out = tmp_path / "run"
    result = _run(folder, out, "resnet_20", ckpt)
    _check_finished(out, result)
    again = _run(folder, out, "resnet_20", ckpt)  # a rerun skips every stage
    assert sum("done before, skipped" in line for line in again["logs"]) == 9


@pytest.mark.slow
def test_own_module_factory_model_on_an_image_folder(folder: Path, tmp_path: Path, monkeypatch):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent('''
        from torch import nn


        def make_net(num_classes=10):
            def block(cin, cout, stride):
                return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True))
            return nn.Sequential(block(3, 16, 1), block(16, 32, 2), block(32, 32, 1), block(32, 64, 2),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    ref = "userpkg.nets:make_net"
    torch.manual_seed(0)
    ckpt = _save_init(models.create(ref, num_classes=CLASSES), tmp_path / "own.pt")
    out = tmp_path / "run"
    result = _run(folder, out, ref, ckpt)
    _check_finished(out, result)
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["groups"]) >= 3  # every conv of the user's model was prunable


@pytest.mark.slow
def test_torchvision_resnet18_on_an_image_folder(folder: Path, tmp_path: Path):
    torch.manual_seed(0)
    ckpt = _save_init(models.create("torchvision:resnet18", num_classes=CLASSES), tmp_path / "r18.pt")
    out = tmp_path / "run"
    result = _run(folder, out, "torchvision:resnet18", ckpt, image_size=64, resize_size=72)
    _check_finished(out, result, size=64)
