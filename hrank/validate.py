"""Checks that turn silent garbage into one-line errors (non-finite weights), for every command that loads a model."""

from __future__ import annotations

import torch
from torch import nn

from hrank.errors import HRankError


def check_finite(model: nn.Module, what: str = "the model") -> nn.Module:
    """Raise unless every floating-point parameter and buffer of ``model`` is finite; return the model.

    A checkpoint with NaN or inf weights would otherwise be pruned, fine-tuned or evaluated into a NaN model
    and numbers like "loss nan" with exit code 0.
    """
    bad = [name for name, t in model.state_dict().items()
           if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise HRankError(f"{what} holds non-finite weights (NaN or inf) in {bad[0]}{more}; refusing to use it")
    return model

