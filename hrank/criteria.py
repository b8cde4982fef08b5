"""Filter-scoring criteria other than HRank's ranks, producing the same per-conv score dicts for plans.

An ablation is one flag: ``hrank`` (mean feature-map rank), ``l1`` (L1 norm of each filter's weights, Li et
al. 2017) or ``random`` (seeded uniform scores). Higher score = more important, for every criterion.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from hrank.errors import HRankError

CRITERIA = ("hrank", "l1", "random")


def _convs(model: nn.Module, convs: Iterable[str] | None) -> dict[str, nn.Conv2d]:
    modules = dict(model.named_modules())
    names = list(convs) if convs is not None else [n for n, m in modules.items() if isinstance(m, nn.Conv2d)]
    out = {}
    for name in names:
        m = modules.get(name)
        if not isinstance(m, nn.Conv2d):
            raise HRankError(f"{name!r} is not a Conv2d of this model")
        out[name] = m
    return out


def l1_scores(model: nn.Module, convs: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """Sum of absolute weights of each output filter (float64)."""
    with torch.no_grad():
        return {name: m.weight.detach().abs().flatten(1).sum(1).double().cpu().numpy()
                for name, m in _convs(model, convs).items()}


def random_scores(model: nn.Module, convs: Iterable[str] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded uniform scores: the same seed and model layout give the same scores."""
    rng = np.random.default_rng(seed)
    return {name: rng.random(m.out_channels) for name, m in _convs(model, convs).items()}


def weight_scores(criterion: str, model: nn.Module, convs: Iterable[str] | None = None,
                  seed: int = 0) -> dict[str, np.ndarray]:
    """Scores of a data-free criterion by name (``l1`` or ``random``)."""
    if criterion == "l1":
        return l1_scores(model, convs)
    if criterion == "random":
        return random_scores(model, convs, seed)
    raise HRankError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
