"""Devices and the process group: which device to use, whether this process is one of several under
``torchrun``, and the few collectives the pipeline needs (all on the library side, never the CLI's)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

from hrank.errors import HRankError

T = TypeVar("T")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """``auto`` (or None) picks CUDA when present, else CPU; an unavailable device is a clear error."""
    if isinstance(name, torch.device):
        name = str(name)
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise HRankError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise HRankError(f"device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HRankError("CUDA was requested but is not available on this machine")
    return dev


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a DDP job; ``world_size == 1`` when not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @staticmethod
    def current() -> DistInfo:
        """The running process group's rank and size (single process when none is initialised)."""
        if tdist.is_available() and tdist.is_initialized():
            return DistInfo(tdist.get_rank(), tdist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
        return DistInfo()


def init_distributed(device: str | torch.device | None = None) -> tuple[DistInfo, torch.device]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1); pick this process's device.

    NCCL on CUDA, gloo on CPU. Without torchrun (or with one process) nothing is initialised and the
    device is ``device`` (``auto``/None: CUDA when available).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world <= 1:
        return DistInfo(), dev
    if "LOCAL_RANK" not in os.environ:
        raise HRankError("WORLD_SIZE > 1 but LOCAL_RANK is not set: start multi-process runs with torchrun")
    local_rank = int(os.environ["LOCAL_RANK"])
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not tdist.is_initialized():
        tdist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(tdist.get_rank(), tdist.get_world_size(), local_rank), dev


def all_reduce(t: torch.Tensor, dist: DistInfo, op: Any = None) -> torch.Tensor:
    """Sum (or ``op``) ``t`` over the processes in place; a no-op in a single process."""
    if dist.enabled:
        tdist.all_reduce(t, op=op or tdist.ReduceOp.SUM)
    return t


def shutdown_distributed(wait: bool = True) -> None:
    """Leave the process group, if one was joined: after a barrier when every process ends normally (``wait``),
    so that none tears down its connections while a peer still holds them (gloo can abort a peer that finds
    its connections gone at exit, failing a run that succeeded); without one when leaving on an error, where
    a peer may never arrive."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return
    if wait:
        with contextlib.suppress(Exception):  # a peer already gone: nothing left to wait for
            tdist.barrier()
    tdist.destroy_process_group()


@contextlib.contextmanager
def process_group_scope() -> Iterator[None]:
    """The body of a command that may have joined a process group: on leaving it, ``shutdown_distributed``,
    with the barrier when the body ended normally and without it when it raised."""
    try:
        yield
    except BaseException:
        shutdown_distributed(wait=False)
        raise
    shutdown_distributed(wait=True)


def barrier(dist: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if dist.enabled:
        tdist.barrier()


def broadcast(obj: T, dist: DistInfo) -> T:
    """Rank 0's ``obj`` on every process (picklable objects only; a no-op in a single process)."""
    if not dist.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T], dist: DistInfo) -> T | None:
    """Run ``fn`` on rank 0 only; every process returns after it, and an error on rank 0 (HRankError or any
    other) is raised on every process as one line instead of leaving the others waiting forever."""
    if not dist.enabled:
        return fn()
    result, error = None, None
    if dist.is_main:
        try:
            result = fn()
        except HRankError as e:
            error = str(e)
            failure = e
        except BaseException as e:  # noqa: BLE001 - reported to the other processes, then re-raised
            error = f"{type(e).__name__}: {e}"
            failure = e
    error = broadcast(error, dist)
    if error is not None:
        if dist.is_main:
            raise failure
        raise HRankError(f"rank 0 failed: {error}")
    return result
