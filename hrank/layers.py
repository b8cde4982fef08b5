"""Which layers hrank scores and prunes: 2-D convolutions, plain and transposed.

One definition shared by specs, plans, pruning and ranks, so that a new layer type is added in one place.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CONV_TYPES", "HRANK_TENSOR_PREFIX", "is_conv", "conv_names", "is_grouped", "is_depthwise",
           "per_filter_extras"]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.ConvTranspose2d)
# Names of the buffers hrank itself registers on a model's modules (mask mode): never the model's own tensors.
HRANK_TENSOR_PREFIX = "hrank_"


def is_conv(m: object) -> bool:
    """A layer whose output channels hrank can score and remove (Conv2d or ConvTranspose2d)."""
    return isinstance(m, CONV_TYPES)


def conv_names(model: nn.Module) -> dict[str, int]:
    """conv name -> output channels, in module order."""
    return {n: m.out_channels for n, m in model.named_modules() if is_conv(m)}


def is_depthwise(m: nn.Module) -> bool:
    """One filter per input channel (groups == in == out): its inputs and outputs are the same channels."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


def is_grouped(m: nn.Module) -> bool:
    """A grouped conv that is not depthwise: channels come in ``groups`` blocks that must stay equal."""
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1 and not is_depthwise(m)


def per_filter_extras(m: nn.Module, width: int | None = None) -> dict[str, torch.Tensor]:
    """A conv subclass's own tensors besides ``weight`` and ``bias`` with one entry per output filter (first
    dimension ``out_channels``), such as NF-ResNet's ``ScaledStdConv2d.gain``. Torch-Pruning slices only the
    weight and bias of a conv, so hrank slices these with them (and counts them in budgets). ``width``: the
    filter count to look for (default ``out_channels``; the count before a prune changed it)."""
    if not isinstance(m, nn.modules.conv._ConvNd):
        return {}
    width = m.out_channels if width is None else width
    tensors = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
    return {name: t for name, t in tensors if name not in ("weight", "bias")
            and not name.startswith(HRANK_TENSOR_PREFIX) and t is not None and t.dim() >= 1 and t.shape[0] == width}
