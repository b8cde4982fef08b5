"""BatchNorm whose batch statistics span every DDP process, on any backend (gloo on CPU included).

``torch.nn.SyncBatchNorm`` runs only on CUDA (and privateuse1) devices, so a CPU run under ``torchrun``
could not make BatchNorm see the global batch. :class:`SyncBatchNormMixin` computes, in training mode
inside a process group of more than one process, the mean and (biased) variance of the *global* batch:
every process contributes its count, mean and sum of squared deviations per channel (float64), one
differentiable all-reduce gathers them, and Chan's parallel formula combines them without cancellation.
The gradient flows through that all-reduce, so N processes with batch B/N compute what one process with
batch B computes, up to the float summation order. The running statistics are updated as BatchNorm does
(momentum, or a cumulative average when ``momentum`` is None; unbiased variance). In eval mode, and
outside a process group, it is plain BatchNorm.

:func:`convert_sync_bn` swaps the classes in place (``BatchNorm2d`` becomes :class:`SyncBatchNorm2d`, a
subclass of it), so parameters, buffers (hrank's mask buffers included), hooks and flags stay as they
were, ``isinstance(m, nn.BatchNorm2d)`` still holds, and the state_dict keys, shapes and versions are
those of plain BatchNorm: checkpoints load into an unsynced model. On CUDA it uses
``nn.SyncBatchNorm.convert_sync_batchnorm`` instead (fused kernels).
"""

from __future__ import annotations

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["SyncBatchNormMixin", "SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNorm3d", "convert_sync_bn",
           "revert_sync_bn", "has_batchnorm", "is_synced"]


def _group_size(group: object | None) -> int:
    """Processes in ``group`` (the default group when None); 1 when no process group is initialised."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return 1
    return tdist.get_world_size(group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the processes with a gradient: the gradient of a sum is the sum of the gradients
    (torch.distributed.nn.functional.all_reduce does the same, but is deprecated)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, t: torch.Tensor, group: object | None) -> torch.Tensor:
        ctx.group = group  # type: ignore[attr-defined]
        t = t.clone(memory_format=torch.contiguous_format)
        tdist.all_reduce(t, group=group)
        return t

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None  # type: ignore[attr-defined]


def _global_stats(x: torch.Tensor, group: object | None, size: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, biased variance, count) per channel (dim 1) of ``x`` over every process, float64, with
    autograd through the reduction. Each process writes (n, mean, M2) into its own row of a zero table and
    one all-reduce (sum) gathers the table; the rows combine with Chan et al.'s formula (no E[x²]-E[x]²
    cancellation)."""
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1] if x.shape[1] else 0
    xs = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if n > 0:
        var, mean = torch.var_mean(xs, dim=dims, correction=0)
        mean, m2 = mean.double(), var.double() * n
    else:  # an empty shard contributes nothing
        mean = m2 = xs.new_zeros(x.shape[1], dtype=torch.float64)
    count = torch.full_like(mean, float(n))
    rank = tdist.get_rank(group)
    table = torch.zeros(size, 3, x.shape[1], dtype=torch.float64, device=x.device)
    table = table.index_put((torch.tensor([rank], device=x.device),), torch.stack([count, mean, m2]).unsqueeze(0))
    table = _AllReduceSum.apply(table, group)
    counts, means, m2s = table.unbind(1)  # (size, C) each
    total = counts.sum(0)
    n_all = int(total[0]) if total.numel() else 0
    if n_all <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {n_all} over all processes")
    g_mean = (counts * means).sum(0) / total
    g_m2 = (m2s + counts * (means - g_mean) ** 2).sum(0)
    return g_mean, g_m2 / total, n_all


class SyncBatchNormMixin:
    """BatchNorm with global batch statistics under a process group (any backend); see the module docstring.

    Mixed in before a ``_BatchNorm`` class; ``process_group`` (None: the default group) is the group the
    statistics span.
    """

    process_group: object | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn: _BatchNorm = self  # type: ignore[assignment]
        size = _group_size(self.process_group) if bn.training else 1
        if size <= 1:  # eval mode, or nothing to synchronise with: plain BatchNorm
            return super().forward(x)  # type: ignore[misc]
        bn._check_input_dim(x)
        factor = bn.momentum if bn.momentum is not None else 0.0
        if bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average, as BatchNorm
                factor = 1.0 / float(bn.num_batches_tracked)
        mean, var, n = _global_stats(x, self.process_group, size)
        if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
            with torch.no_grad():
                bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), factor)
                bn.running_var.lerp_((var * (n / (n - 1))).to(bn.running_var.dtype), factor)
        shape = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return x * scale.to(x.dtype).view(shape) + shift.to(x.dtype).view(shape)


class SyncBatchNorm1d(SyncBatchNormMixin, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` with global batch statistics under a process group."""


class SyncBatchNorm2d(SyncBatchNormMixin, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with global batch statistics under a process group."""


class SyncBatchNorm3d(SyncBatchNormMixin, nn.BatchNorm3d):
    """``nn.BatchNorm3d`` with global batch statistics under a process group."""


_SYNCED: dict[type, type] = {nn.BatchNorm1d: SyncBatchNorm1d, nn.BatchNorm2d: SyncBatchNorm2d,
                             nn.BatchNorm3d: SyncBatchNorm3d}


def _synced_class(cls: type) -> type:
    """The synchronised subclass of a BatchNorm class (made once for classes other than BatchNorm1d/2d/3d)."""
    if cls not in _SYNCED:
        _SYNCED[cls] = type(f"Sync{cls.__name__}", (SyncBatchNormMixin, cls),
                            {"__doc__": f"{cls.__name__} with global batch statistics under a process group.",
                             "__module__": __name__})
    return _SYNCED[cls]


def is_synced(module: nn.Module) -> bool:
    """Whether ``module`` is a BatchNorm whose statistics span the process group (ours or torch's)."""
    return isinstance(module, (SyncBatchNormMixin, nn.SyncBatchNorm))


def has_batchnorm(model: nn.Module) -> bool:
    """Whether ``model`` holds any BatchNorm (the only layers SyncBN changes)."""
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def convert_sync_bn(model: nn.Module, device: torch.device, process_group: object | None = None) -> nn.Module:
    """Make every BatchNorm of ``model`` synchronise its batch statistics over ``process_group``.

    CUDA: ``nn.SyncBatchNorm.convert_sync_batchnorm`` (torch's fused kernels; new modules, same state_dict).
    Elsewhere: each ``_BatchNorm`` changes class in place to its synchronised subclass, keeping parameters,
    buffers, hooks and flags. Returns the model (the same object unless torch replaced a BatchNorm root).
    """
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model, process_group)
    for m in model.modules():
        if isinstance(m, _BatchNorm) and not isinstance(m, SyncBatchNormMixin):
            m.__class__ = _synced_class(type(m))
            m.process_group = process_group
    return model


def revert_sync_bn(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_bn`'s class swap (CPU conversion): every synchronised BatchNorm is plain again."""
    for m in model.modules():
        if isinstance(m, SyncBatchNormMixin):
            m.__class__ = next(c for c in type(m).__mro__ if c is not SyncBatchNormMixin
                               and not issubclass(c, SyncBatchNormMixin) and issubclass(c, _BatchNorm))
            m.__dict__.pop("process_group", None)
    return model


# Per-process batches below this many images get SyncBN under ``sync_bn: auto`` (docs/benchmarks.md,
# "DDP and SyncBN", holds the measurement behind the value).
SYNC_BN_AUTO_BELOW = 64


def use_sync_bn(setting: str | bool, model: nn.Module, per_process_batch: int, world_size: int) -> bool:
    """The recipe's ``sync_bn`` (auto/on/off; booleans from old records mean on/off) resolved for a run:
    never in one process or without BatchNorm; ``auto`` turns it on below ``SYNC_BN_AUTO_BELOW`` images per
    process, where per-process statistics are noisiest and the all-reduce is cheapest relative to compute."""
    if world_size <= 1 or not has_batchnorm(model):
        return False
    if isinstance(setting, bool):
        return setting
    if setting == "auto":
        return per_process_batch < SYNC_BN_AUTO_BELOW
    return setting == "on"
