"""`hrank run` end to end on an image folder (ImageNet layout), with a registry model, a user's
``module:factory`` model and ``torchvision:resnet18``. Needs torchvision (the CI's second venv runs it)."""

from __future__ import annotations

import json
import os
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")

import hrank  # noqa: E402
from hrank import config, flops, models  # noqa: E402
from hrank.run import run  # noqa: E402
from tests.helpers import max_rel_diff, onnx_output  # noqa: E402
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


def _own_folder_accuracy(model: torch.nn.Module, val: Path, norm: dict, size: int, resize: int) -> tuple[float, float]:
    """Top-1/top-5 on ``val/<class>/*.png`` (classes sorted): decode, Resize(resize) + CenterCrop(size) as
    torchvision's ImageNet evaluation does, [0, 1], (x - mean) / std, one image at a time."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    tf = v2.Compose([v2.Resize(resize, antialias=True), v2.CenterCrop(size)])
    classes = sorted(p.name for p in val.iterdir() if p.is_dir())
    mean, std = torch.tensor(norm["mean"]).view(-1, 1, 1), torch.tensor(norm["std"]).view(-1, 1, 1)
    top1 = top5 = n = 0
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 deprecates its decoders
        for label, cls in enumerate(classes):
            for f in sorted((val / cls).iterdir()):
                img = tf(decode_image(str(f), mode=ImageReadMode.RGB))
                out = model(((img.float() / 255.0 - mean) / std)[None])[0]
                top1 += int(out.argmax()) == label
                top5 += label in out.topk(min(5, out.numel())).indices.tolist()
                n += 1
    return 100.0 * top1 / n, 100.0 * top5 / n


def _check_finished(out: Path, result: dict, size: int = 32) -> None:
    summary = result["summary"]
    base, final = summary["stages"][0], summary["stages"][-1]
    assert final["macs"] < base["macs"]
    ranks = json.loads((out / "spec.json").read_text())
    assert ranks["budget"]["achieved"] <= ranks["budget"]["target"] * 1.05
    model, meta = hrank.load(out / "model.pt")  # rebuilt from the recorded reference, no builder
    # the stored accuracy is model.pt's on the val folder, evaluated here by a loop of our own
    cfg = json.loads((out / "config.json").read_text())
    cfg = cfg.get("config", cfg)
    top1, top5 = _own_folder_accuracy(model, Path(cfg["data_dir"]) / "val", meta["normalization"], size,
                                      cfg["resize_size"])
    assert abs(final["test_top1"] - top1) <= 1e-9 and abs(final["test_top5"] - top5) <= 1e-9
    # the exported ONNX file computes what model.pt computes, on an input of our own
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.eval()(x).numpy()
    assert max_rel_diff(onnx_output(out / "model.onnx", x), ref) <= 1e-4
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
