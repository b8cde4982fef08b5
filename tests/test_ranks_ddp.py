"""compute_ranks under torch.distributed: 2 CPU processes (gloo) give exactly the ranks of 1 process."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hrank import models
from hrank.data import ImageSet
from hrank.distributed import process_group_scope
from hrank.errors import HRankError
from hrank.ranks import Ranks, compute_ranks

NUM_IMAGES, BATCH = 24, 6


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create("resnet_20")
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def _data() -> ImageSet:
    g = torch.Generator().manual_seed(1)
    imgs = torch.randint(0, 256, (40, 3, 32, 32), generator=g, dtype=torch.uint8)
    return ImageSet(imgs, torch.zeros(40, dtype=torch.long), [str(i) for i in range(10)], "random")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    with process_group_scope():  # leaves the group after a barrier, as the CLIs do
        ranks = compute_ranks(_model(), _data(), num_images=NUM_IMAGES, batch_size=BATCH, progress=False)
        ranks.save(Path(out_dir) / f"rank{rank}.npz")
        try:  # a failure on one process must reach the other one instead of hanging it
            compute_ranks(_model(), _data(), num_images=NUM_IMAGES, batch_size=BATCH, progress=False,
                          points={"conv1": "layer3.0.relu2"} if rank == 1 else None)
        except HRankError as e:
            Path(out_dir, f"error{rank}.txt").write_text(str(e))


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    single = compute_ranks(_model(), _data(), num_images=NUM_IMAGES, batch_size=BATCH, progress=False)
    for rank in (0, 1):
        got = Ranks.load(tmp_path / f"rank{rank}.npz")
        assert got.num_images == NUM_IMAGES and got.meta["world_size"] == 2
        assert list(got.scores) == list(single.scores)
        for conv, s in single.scores.items():
            np.testing.assert_array_equal(got.scores[conv], s)
    assert "does not match its 16 filters" in (tmp_path / "error1.txt").read_text()
    assert "failed on another process" in (tmp_path / "error0.txt").read_text()
