"""torchrun on every stage: `hrank rank` and `hrank run` in 2 gloo processes on CPU give what 1 process gives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hrank import models
from hrank.ranks import Ranks
from tests.conftest import write_cifar

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "HRANK_NO_PROGRESS": "1",
           "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
    for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _hrank(args: list[str], cwd: Path, processes: int = 1) -> str:
    cmd = (TORCHRUN if processes == 2 else [sys.executable]) + ["-m", "hrank", *args]
    r = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def _checkpoint(path: Path) -> Path:
    """A resnet_20 with non-trivial BN statistics, so ranks differ between filters."""
    torch.manual_seed(0)
    model = models.create("resnet_20")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.3, 0.3)
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    write_cifar(root / "data", n_train=96, n_test=32)
    _checkpoint(root / "base.pt")
    return root


@pytest.mark.slow
def test_torchrun_rank_writes_one_file_equal_to_one_process(workspace: Path):
    common = ["rank", "--model", "resnet_20", "--checkpoint", "base.pt", "--data-dir", "data", "--no-download",
              "--num-images", "24", "--batch-size", "6", "--device", "cpu"]
    _hrank(common + ["--out", "one.npz"], workspace)
    out = _hrank(common + ["--out", "two.npz"], workspace, processes=2)
    assert out.count("wrote two.npz") == 1  # rank 0 alone prints and writes
    one, two = Ranks.load(workspace / "one.npz"), Ranks.load(workspace / "two.npz")
    assert one.meta["world_size"] == 1 and two.meta["world_size"] == 2 and two.num_images == 24
    assert list(one.scores) == list(two.scores)
    for conv, s in one.scores.items():
        np.testing.assert_array_equal(two.scores[conv], s)
    assert not list(workspace.glob("two.npz.*"))  # no temporary or second file left


@pytest.mark.slow
def test_torchrun_run_gives_the_ranks_and_plan_of_one_process_and_resumes(workspace: Path):
    cfg = {"model": "resnet_20", "checkpoint": "base.pt", "data_dir": "data", "download": False, "val_size": 16,
           "rank_images": 24, "rank_batch_size": 6, "recalibrate_images": 16, "compress_rate": "[0.25]*19",
           "finetune": {"epochs": 1, "batch_size": 16}, "latency": False, "export": [], "device": "cpu"}
    (workspace / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    _hrank(["run", "cfg.yaml", "--out", "run1"], workspace)
    log = _hrank(["run", "cfg.yaml", "--out", "run2"], workspace, processes=2)
    one, two = workspace / "run1", workspace / "run2"
    r1, r2 = Ranks.load(one / "scores.npz"), Ranks.load(two / "scores.npz")
    assert r2.meta["world_size"] == 2
    for conv, s in r1.scores.items():
        np.testing.assert_array_equal(r2.scores[conv], s)
    p1, p2 = (json.loads((d / "plan.json").read_text()) for d in (one, two))
    assert p1["groups"] == p2["groups"]  # the same kept channels
    assert json.loads((two / "config.json").read_text())["world_size"] == 2
    f1, f2 = (json.loads((d / "final.json").read_text()) for d in (one, two))
    assert f1["macs"] == f2["macs"] and f1["params"] == f2["params"]
    assert log.count("[report]") == 1  # one process prints
    ft = json.loads((two / "finetune" / "config.json").read_text())
    assert ft["world_size"] == 2

    # a second invocation (what a resumed, interrupted run does) skips every finished stage on every process
    again = _hrank(["run", "cfg.yaml", "--out", "run2"], workspace, processes=2)
    assert again.count("done before, skipped") == 9
