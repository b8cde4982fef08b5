"""Success paths end to end, checked against values computed here: ``python -m hrank run`` from the command
line, ``hrank report`` rebuilding the run's report, the pruned model exported to ONNX and TorchScript, and
``final.json`` against a fresh ``hrank eval`` of ``model.pt`` on the same images. One finished run, shared."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import hrank
from hrank import models
from hrank.cli import main
from tests.conftest import write_cifar
from tests.helpers import max_rel_diff, onnx_output, own_accuracy, read_cifar_batch

REPO = Path(__file__).resolve().parents[1]
TEST_SUBSET = 20  # of the 32 generated test images: final.json must be about exactly these
CONFIG = {
    "model": "resnet_20", "val_size": 16, "rank_images": 32, "rank_batch_size": 16, "recalibrate_images": 32,
    "compress_rate": "[0.25]*19", "finetune": {"epochs": 1, "batch_size": 16},
    "baseline": {"epochs": 1, "batch_size": 16}, "latency": False, "test_subset": TEST_SUBSET,
    "export": ["onnx", "torchscript"], "download": False,
}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """``python -m hrank run CONFIG --out RUN`` in a subprocess, as a user types it."""
    root = tmp_path_factory.mktemp("success")
    data = write_cifar(root / "data")
    cfg_file = root / "tiny.yaml"
    cfg_file.write_text(yaml.safe_dump({**CONFIG, "data_dir": str(data)}))
    run_dir = root / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HRANK_NO_PROGRESS": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-W", "ignore::UserWarning", "-m", "hrank", "run", str(cfg_file),
                           "--out", str(run_dir), "--no-progress"],
                          capture_output=True, text=True, env=env, cwd=root, timeout=600)
    return {"root": root, "data": data, "run": run_dir, "proc": proc}


@pytest.fixture(scope="module")
def loaded(finished):
    """model.pt rebuilt once (``hrank.load`` replays the plan): (model in eval mode, metadata)."""
    assert finished["proc"].returncode == 0, finished["proc"].stderr[-3000:]
    model, meta = hrank.load(finished["run"] / "model.pt")
    return model.eval(), meta


def test_cli_run_exits_0_and_writes_every_artefact(finished, loaded):
    proc, run_dir = finished["proc"], finished["run"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("config.json", "baseline.pt", "baseline.json", "scores.npz", "spec.json", "plan.json", "pruned.pt",
                 "prune.json", "finetune/metrics.jsonl", "model.pt", "final.json", "model.onnx",
                 "model.torchscript.pt", "export.json", "summary.json", "report.md", "report.html"):
        assert (run_dir / name).is_file(), name
    assert "[report]" in proc.stdout
    # the pruned widths are HRank's int(0.25 * C) removals, group by group
    model, meta = loaded
    assert meta["mode"] == "physical"
    convs = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    dense = {n: m.out_channels for n, m in models.create("resnet_20").named_modules()
             if isinstance(m, torch.nn.Conv2d)}
    assert convs == {n: c - int(0.25 * c) for n, c in dense.items()}


def test_report_rebuilds_the_same_report(finished, tmp_path, capsys):
    assert finished["proc"].returncode == 0
    run_dir = tmp_path / "run"
    shutil.copytree(finished["run"], run_dir)
    before = {name: (run_dir / name).read_text() for name in ("report.md", "report.html")}
    for name in before:
        (run_dir / name).unlink()
    assert main(["report", str(run_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    after = {name: (run_dir / name).read_text() for name in before}
    assert after == before  # no timestamps in either: byte-identical
    assert "resnet_20" in after["report.md"] and "<html" in after["report.html"].lower()


def test_pruned_model_exports_compute_what_pytorch_computes(finished, loaded):
    """The run exported the pruned model.pt; read back with onnxruntime and torch.jit.load, both compute what
    the PyTorch model computes on an input of our own (another batch size than the exporter's check)."""
    pytest.importorskip("onnxruntime")
    run_dir = finished["run"]
    model, _ = loaded
    assert model.layer3[0].conv1.out_channels == 48  # really pruned: 64 - int(0.25 * 64)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2024))
    with torch.no_grad():
        ref = model(x).numpy()
    assert np.abs(ref).max() > 0.1  # a meaningful output to compare against
    got = onnx_output(run_dir / "model.onnx", x)
    assert got.shape == (6, 10) and max_rel_diff(got, ref) <= 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load is deprecated in torch 2.13
        scripted = torch.jit.load(str(run_dir / "model.torchscript.pt"))
    with torch.no_grad():
        assert max_rel_diff(scripted(x).numpy(), ref) <= 1e-4
    # the dense network computes something else: the comparison can tell models apart
    dense = models.create("resnet_20").eval()
    with torch.no_grad():
        assert max_rel_diff(dense(x).numpy(), ref) > 1e-2


def test_final_json_equals_a_fresh_eval_of_model_pt(finished, loaded, tmp_path, capsys):
    assert finished["proc"].returncode == 0
    run_dir, data = finished["run"], finished["data"]
    final = json.loads((run_dir / "final.json").read_text())
    # test_subset: the run evaluated the first 20 test images; give `hrank eval` exactly those as a batch file
    with open(data / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    subset = tmp_path / "test_first20"
    with open(subset, "wb") as f:
        pickle.dump({b"data": batch[b"data"][:TEST_SUBSET], b"labels": batch[b"labels"][:TEST_SUBSET],
                     b"batch_label": b"test"}, f, protocol=2)
    metrics_file = tmp_path / "eval.json"
    assert main(["eval", "--model-file", str(run_dir / "model.pt"), "--split", str(subset), "--data-dir", str(data),
                 "--json", str(metrics_file), "--batch-size", "6"]) == 0
    capsys.readouterr()
    fresh = json.loads(metrics_file.read_text())
    assert fresh["count"] == TEST_SUBSET
    assert abs(final["test_top1"] - fresh["top1"]) <= 1e-9 and abs(final["test_top5"] - fresh["top5"]) <= 1e-9
    # and a loop of our own, with the normalization model.pt carries
    model, meta = loaded
    images, labels = read_cifar_batch(data / "cifar-10-batches-py" / "test_batch")
    norm = meta["normalization"]
    assert fresh["normalization"]["mean"] == norm["mean"]
    top1, top5 = own_accuracy(model, images[:TEST_SUBSET], labels[:TEST_SUBSET], norm["mean"], norm["std"])
    assert abs(final["test_top1"] - top1) <= 1e-9 and abs(final["test_top5"] - top5) <= 1e-9
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"][-1]["test_top1"] == final["test_top1"]
