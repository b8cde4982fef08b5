"""What every registered architecture tells hrank about itself: rate entries, rank points, defaults."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class RankPoint:
    """Where a conv's filters are scored: the output of ``module``, channels ``[start, stop)`` (all if None).

    ``call`` picks one call (0-based) of a module that runs more than once per forward pass, such as a
    torchvision BasicBlock's single ``relu`` used before and after the residual add; None: it runs once.
    ``act`` names an activation that hrank applies to that output before ranking ("relu", "silu",
    "leaky_relu:0.1", ... see ``hrank.ranks``): the point of a functional activation such as
    ``F.relu(bn(x))``, which cannot be hooked itself; None: the output is ranked as it is.
    """

    module: str
    channels: tuple[int, int] | None = None
    call: int | None = None
    act: str | None = None

    def to_json(self) -> dict:
        d: dict = {"module": self.module, "channels": list(self.channels) if self.channels else None}
        if self.call is not None:
            d["call"] = self.call
        if self.act is not None:
            d["act"] = self.act
        return d

    @staticmethod
    def from_json(d: dict) -> RankPoint:
        ch = d.get("channels")
        return RankPoint(d["module"], tuple(ch) if ch else None, d.get("call"), d.get("act"))


@dataclass(frozen=True)
class ArchSpec:
    """A registered architecture: how to build it and its HRank facts (official rate order, hook points)."""

    name: str
    builder: Callable[..., nn.Module]
    dataset: str  # "cifar" or "imagenet"
    input_size: tuple[int, int, int]
    num_classes: int
    normalization: str  # default normalization preset for training from scratch
    rate_entries: Callable[[nn.Module], list[tuple[str, ...]]]
    rank_points: Callable[[nn.Module], dict[str, RankPoint]]
    fixed_zero_entries: frozenset[int] = field(default_factory=frozenset)
    description: str = ""


class ChannelPadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride``, copy input channel ``src[i]`` to output channel ``dst[i]``.

    Unpruned it equals ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` with ``p = planes // 4``. It holds
    no parameters, so state_dict keys match the official lambda; ``src``/``dst`` are non-persistent
    buffers that the pruner rewrites when the input or output stream loses channels.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError("ChannelPadShortcut needs out_channels >= in_channels")
        pad = (out_channels - in_channels) // 2
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.register_buffer("src", torch.arange(in_channels), persistent=False)
        self.register_buffer("dst", torch.arange(pad, pad + in_channels), persistent=False)

    def set_mapping(self, in_channels: int, out_channels: int, src: list[int], dst: list[int]) -> None:
        """Replace the channel map (used after pruning): ``src`` indexes the input, ``dst`` the output."""
        if len(src) != len(dst):
            raise ValueError("src and dst must have the same length")
        device = self.src.device
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.src = torch.tensor(src, dtype=torch.long, device=device)
        self.dst = torch.tensor(dst, dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        out = x.new_zeros(x.shape[0], self.out_channels, x.shape[2], x.shape[3])
        return out.index_copy(1, self.dst, x.index_select(1, self.src))

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}, mapped={self.src.numel()}"
