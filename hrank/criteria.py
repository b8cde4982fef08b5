"""The criterion registry: how filters are scored, each criterion producing a :class:`hrank.ranks.Ranks`.

An ablation is one flag: ``hrank`` (mean feature-map rank; needs images), ``l1`` (L1 norm of each filter's
weights, Li et al. 2017) or ``random`` (seeded uniform scores). Higher score = more important, for every
criterion. A new criterion is one function ``(model, ScoreInputs) -> Ranks`` plus one ``register`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from hrank.errors import HRankError


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
    raise HRankError(f"unknown criterion {criterion!r}; choose one of {', '.join(names())}")


@dataclass(frozen=True)
class ScoreInputs:
    """What a criterion may use besides the model (data criteria use the images; others ignore them)."""

    convs: Sequence[str] | None = None  # restrict to these convs (default: every prunable conv)
    seed: int = 0
    data: Any = None  # a hrank.data.Split (its rank_input() is what is ranked)
    num_images: int = 500
    batch_size: int = 128
    augment: bool = True
    normalization: Any = None
    device: torch.device | None = None
    progress: bool = True
    method: str = "gram"


@dataclass(frozen=True)
class Criterion:
    """One registered criterion."""

    name: str
    description: str
    needs_data: bool
    score: Callable[[nn.Module, ScoreInputs], Any]  # -> hrank.ranks.Ranks


_REGISTRY: dict[str, Criterion] = {}


def register(criterion: Criterion) -> Criterion:
    """Make a criterion available under its name (to ``hrank run``, ``hrank prune`` and the API)."""
    _REGISTRY[criterion.name] = criterion
    return criterion


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Criterion:
    if name not in _REGISTRY:
        raise HRankError(f"unknown criterion {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def score(name: str, model: nn.Module, inputs: ScoreInputs | None = None) -> Any:
    """Score ``model``'s filters with the criterion ``name``; returns a ``Ranks`` (scores + provenance)."""
    crit = get(name)
    inputs = inputs or ScoreInputs()
    if crit.needs_data and inputs.data is None:
        raise HRankError(f"criterion {name} needs images to score filters (give the data, or a ranks file)")
    return crit.score(model, inputs)


def _weight_criterion(name: str) -> Callable[[nn.Module, ScoreInputs], Any]:
    def fn(model: nn.Module, inputs: ScoreInputs) -> Any:
        from hrank import models
        from hrank.ranks import Ranks, model_fingerprint

        convs = list(inputs.convs) if inputs.convs is not None else list(models.prunable_convs(model))
        arch = getattr(model, "hrank_arch", None)
        return Ranks(weight_scores(name, model, convs, seed=inputs.seed), 0, fingerprint=model_fingerprint(model),
                     arch=arch if arch in models.names() else None, meta={"criterion": name, "seed": inputs.seed})

    return fn


def _hrank(model: nn.Module, inputs: ScoreInputs) -> Any:
    from hrank.ranks import compute_ranks

    source = inputs.data.rank_input(augment=inputs.augment, seed=inputs.seed, normalization=inputs.normalization)
    return compute_ranks(model, source, num_images=inputs.num_images, batch_size=inputs.batch_size,
                         device=inputs.device, progress=inputs.progress, augment=inputs.augment, seed=inputs.seed,
                         normalization=inputs.normalization, convs=inputs.convs, method=inputs.method)


register(Criterion("hrank", "mean matrix rank of each filter's feature maps over training images (HRank)", True,
                   _hrank))
def _chip(model: nn.Module, inputs: ScoreInputs) -> Any:
    from hrank.ranks import compute_scores

    source = inputs.data.rank_input(augment=inputs.augment, seed=inputs.seed, normalization=inputs.normalization)
    return compute_scores(model, source, ("chip",), num_images=inputs.num_images, batch_size=inputs.batch_size,
                          device=inputs.device, progress=inputs.progress, augment=inputs.augment, seed=inputs.seed,
                          normalization=inputs.normalization, convs=inputs.convs)["chip"]


register(Criterion("chip", "mean nuclear-norm drop of each filter's C x HW feature maps when it is removed (CHIP)",
                   True, _chip))
register(Criterion("l1", "L1 norm of each filter's weights (Li et al. 2017)", False, _weight_criterion("l1")))
register(Criterion("random", "seeded uniform scores (a baseline for ablations)", False, _weight_criterion("random")))
