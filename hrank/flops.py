"""MACs and parameters measured on the real module, counted the way the pruning literature counts them.

"FLOPs" in HRank and most pruning papers are multiply-accumulates of Conv2d, ConvTranspose2d and Linear layers
(bias adds, BN, activations, pooling and shortcuts are ignored); params exclude normalization layers. A grouped
conv costs ``C_out * C_in/groups * kh * kw * H_out * W_out``; a transposed conv scatters every input position
through its kernel, so it costs ``C_in * C_out/groups * kh * kw * H_in * W_in`` (its output size depends on stride,
padding and output_padding, its work does not). ``count``
measures any module with forward hooks; ``count_hrank_rule`` reproduces the official HRank counter for a
masked model, which subtracts only pruned *output* channels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from hrank.errors import HRankError
from hrank.io import _error_line

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass
class LayerCount:
    """One Conv2d, ConvTranspose2d or Linear layer: its widths, MACs for one input and parameters.

    ``kind`` is ``"conv"``, ``"conv_transpose"`` or ``"linear"``; ``output_hw`` is the conv's output size.
    """

    name: str
    kind: str
    in_channels: int
    out_channels: int
    macs: int
    params: int
    output_hw: tuple[int, int] | None = None


@dataclass
class Counts:
    """Totals and the per-layer breakdown (Conv2d, ConvTranspose2d and Linear, in forward order)."""

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


_COUNTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def _trace_layers(model: nn.Module, input_size: tuple[int, ...]
                  ) -> list[tuple[str, nn.Module, torch.Size, torch.Size]]:
    """Run one forward pass; return (name, module, input shape, output shape) for every counted layer call.

    A module called twice (shared weights) appears twice: each call costs its MACs.
    """
    calls: list[tuple[str, nn.Module, torch.Size, torch.Size]] = []
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, _COUNTED):
            hooks.append(m.register_forward_hook(
                lambda mod, inp, out, name=name: calls.append((name, mod, inp[0].shape, out.shape))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(_example_input(model, input_size))
    except HRankError:
        raise
    except Exception as e:  # the model cannot take this input (channels, a size it downsamples below 1 pixel)
        raise HRankError(f"the model fails on an input of size {tuple(input_size)} ({_error_line(e)}); "
                         f"check the model's input size") from None
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


def _conv_macs(m: nn.Conv2d | nn.ConvTranspose2d, in_shape: torch.Size, out_shape: torch.Size,
               in_channels: int | None = None, out_channels: int | None = None) -> int:
    """MACs of one conv call for one sample; ``in_channels``/``out_channels`` override the module's widths
    (HRank's rule counts kept filters on the unpruned model)."""
    cin = m.in_channels if in_channels is None else in_channels
    cout = m.out_channels if out_channels is None else out_channels
    kh, kw = m.kernel_size
    if isinstance(m, nn.ConvTranspose2d):  # every input position scatters C_out/groups * k^2 products
        return cin * (cout // m.groups) * kh * kw * int(in_shape[-2]) * int(in_shape[-1])
    return (cin // m.groups) * cout * kh * kw * int(out_shape[-2]) * int(out_shape[-1])


def count(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> Counts:
    """MACs of Conv2d, ConvTranspose2d and Linear for one input of ``input_size`` (C, H, W), and params
    without normalization layers."""
    layers: list[LayerCount] = []
    for name, m, in_shape, shape in _trace_layers(model, input_size):
        params = sum(p.numel() for p in m.parameters(recurse=False))
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            kind = "conv_transpose" if isinstance(m, nn.ConvTranspose2d) else "conv"
            layers.append(LayerCount(name, kind, m.in_channels, m.out_channels, _conv_macs(m, in_shape, shape),
                                     params, (int(shape[-2]), int(shape[-1]))))
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
    for name, m, in_shape, shape in _trace_layers(model, input_size):
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            kept = m.out_channels - int(pruned.get(name, 0))
            cin = m.in_channels - reduction.get(name, 0)
            kh, kw = m.kernel_size
            macs = _conv_macs(m, in_shape, shape, cin, kept)
            pairs = cin * (kept // m.groups) if isinstance(m, nn.ConvTranspose2d) else (cin // m.groups) * kept
            weights = pairs * kh * kw
            params = weights + (kept if m.bias is not None else 0)
            kind = "conv_transpose" if isinstance(m, nn.ConvTranspose2d) else "conv"
            layers.append(LayerCount(name, kind, cin, kept, macs, params, (int(shape[-2]), int(shape[-1]))))
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
