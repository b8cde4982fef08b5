"""Deep copies of user models, with one clear error when a model cannot be copied.

Pruning checks, BatchNorm folding, latency measurement and distillation all work on copies so that the
user's model is never changed by accident; a model ``copy.deepcopy`` refuses (old-style
``torch.nn.utils.weight_norm`` keeps a computed, non-leaf ``weight``) must fail with one line, not a
traceback from the middle of a long run.
"""

from __future__ import annotations

import copy
from typing import TypeVar

from torch import nn

from hrank.errors import HRankError
from hrank.io import _error_line

__all__ = ["copy_model"]

M = TypeVar("M", bound=nn.Module)


def copy_model(model: M) -> M:
    """``copy.deepcopy(model)``, or an :class:`HRankError` that says why the model cannot be copied."""
    try:
        return copy.deepcopy(model)
    except Exception as e:
        hint = ""
        if any(hasattr(m, "weight_g") and hasattr(m, "weight_v") for m in model.modules()):
            hint = ("; it uses the old torch.nn.utils.weight_norm, which keeps a computed weight: use "
                    "torch.nn.utils.parametrizations.weight_norm or remove the weight norm first")
        raise HRankError(f"cannot copy the model ({_error_line(e)}){hint}") from None
