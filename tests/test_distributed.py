"""Leaving the process group: every process waits for the others before tearing its connections down."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.distributed as tdist
import torch.multiprocessing as mp

from hrank.distributed import process_group_scope, shutdown_distributed


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = Path(out_dir)
    if rank == 1:  # the slow process: it gets to the end late
        time.sleep(1.0)
        (out / "rank1_at_end").write_text("")
    shutdown_distributed()
    # rank 0 may only have left after rank 1 reached the end
    (out / f"rank{rank}.txt").write_text(f"{(out / 'rank1_at_end').exists()} {tdist.is_initialized()}")


def test_shutdown_waits_for_every_process_then_leaves(tmp_path: Path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    assert (tmp_path / "rank0.txt").read_text() == "True False"
    assert (tmp_path / "rank1.txt").read_text() == "True False"


def test_shutdown_without_a_group_is_a_no_op():
    assert not tdist.is_initialized()
    shutdown_distributed()
    shutdown_distributed(wait=False)
    assert not tdist.is_initialized()


def test_scope_leaves_the_group_on_both_exits(tmp_path: Path):
    for n, fail in enumerate((False, True)):
        tdist.init_process_group("gloo", init_method=f"file://{tmp_path / f'init{n}'}", rank=0, world_size=1)
        if fail:
            with pytest.raises(ValueError, match="inside"), process_group_scope():
                raise ValueError("inside")
        else:
            with process_group_scope():
                assert tdist.is_initialized()
        assert not tdist.is_initialized()
