"""MACs and parameters measured on the real module, counted the way the pruning literature counts them.

"FLOPs" in HRank and most pruning papers are multiply-accumulates of Conv2d and Linear layers (bias adds,
BN, activations, pooling and shortcuts are ignored); params exclude normalization layers. ``count``
measures any module with forward hooks; ``count_hrank_rule`` reproduces the official HRank counter for a
masked model, which subtracts only pruned *output* channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class LayerCount:
    """One Conv2d or Linear layer: its widths, MACs for one input and parameters."""

    name: str
    kind: str
    in_channels: int
    out_channels: int
    macs: int
    params: int
    output_hw: tuple[int, int] | None = None


@dataclass
class Counts:
    """Totals and the per-layer breakdown (Conv2d and Linear, in forward order)."""

    macs: int
    params: int
    layers: list[LayerCount] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"macs": self.macs, "params": self.params, "layers": [asdict(layer) for layer in self.layers]}


def _example_input(model: nn.Module, input_size: tuple[int, ...]) -> torch.Tensor:
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, *input_size, device=device, dtype=dtype)


def _trace_layers(model: nn.Module, input_size: tuple[int, ...]) -> list[tuple[str, nn.Module, torch.Size]]:
    """Run one forward pass; return (name, module, output shape) for every Conv2d/Linear call."""
    calls: list[tuple[str, nn.Module, torch.Size]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: calls.append((name, mod, out.shape))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_example_input(model, input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return calls


def count_params(model: nn.Module) -> int:
    """Parameters of every layer except normalization layers (the literature's convention)."""
    total = 0
    for m in model.modules():
        if isinstance(m, _NORM_TYPES):
            continue
        total += sum(p.numel() for p in m.parameters(recurse=False))
    return total


def count(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> Counts:
    """MACs of Conv2d and Linear for one input of ``input_size`` (C, H, W), and params without BN."""
    layers: list[LayerCount] = []
    for name, m, shape in _trace_layers(model, input_size):
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            spatial = shape[2] * shape[3]
            macs = (m.in_channels // m.groups) * m.out_channels * kh * kw * spatial
            layers.append(LayerCount(name, "conv", m.in_channels, m.out_channels, macs, params,
                                     (int(shape[2]), int(shape[3]))))
        else:
            positions = shape[:-1].numel() // shape[0]
            layers.append(LayerCount(name, "linear", m.in_features, m.out_features,
                                     m.in_features * m.out_features * positions, params))
    return Counts(sum(layer.macs for layer in layers), count_params(model), layers)


def densenet_input_reduction(model: nn.Module, pruned: Mapping[str, int]) -> dict[str, int]:
    """HRank's DenseNet counter also removes, from a transition's input, every filter pruned upstream in
    the concatenation it reads (the stem or previous transition, plus the block's dense convs)."""
    reduction: dict[str, int] = {}
    source = "conv1"
    for b in (1, 2):
        block = getattr(model, f"dense{b}")
        convs = [source] + [f"dense{b}.{i}.conv1" for i in range(len(block))]
        reduction[f"trans{b}.conv1"] = sum(pruned.get(c, 0) for c in convs)
        source = f"trans{b}.conv1"
    return reduction


def count_hrank_rule(model: nn.Module, pruned: Mapping[str, int],
                     input_size: tuple[int, ...] = (3, 32, 32)) -> Counts:
    """The official HRank counter on the *unpruned* model with ``pruned[conv]`` filters removed per conv.

    Conv MACs = C_in(full) * C_out(kept) * k^2 * H_out * W_out; params likewise plus kept biases. Input
    channels removed upstream are not subtracted, except in DenseNet transitions. Linear layers count
    weights plus biases in both MACs and params, as the official ``get_flops`` does.
    """
    reduction: dict[str, int] = {}
    if getattr(model, "hrank_arch", "").startswith("densenet"):
        reduction = densenet_input_reduction(model, pruned)
    layers: list[LayerCount] = []
    for name, m, shape in _trace_layers(model, input_size):
        if isinstance(m, nn.Conv2d):
            kept = m.out_channels - int(pruned.get(name, 0))
            cin = (m.in_channels - reduction.get(name, 0)) // m.groups
            kh, kw = m.kernel_size
            per_out = cin * kh * kw
            macs = per_out * kept * shape[2] * shape[3]
            params = per_out * kept + (kept if m.bias is not None else 0)
            layers.append(LayerCount(name, "conv", m.in_channels - reduction.get(name, 0), kept, macs, params,
                                     (int(shape[2]), int(shape[3]))))
        else:
            n = m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
            layers.append(LayerCount(name, "linear", m.in_features, m.out_features, n, n))
    return Counts(sum(x.macs for x in layers), sum(x.params for x in layers), layers)


def format_count(n: float, unit: str = "") -> str:
    """Human form used in tables: 125.49M, 1.52B, 0.85M."""
    for div, low, suffix in ((1e9, 1e9, "B"), (1e6, 1e5, "M"), (1e3, 1e3, "K")):
        if abs(n) >= low:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"
