"""hrank: HRank filter pruning for PyTorch CNNs.

Pipeline: data -> models -> ranks -> spec/plan -> prune -> train -> report/export. Each step has its own
module and writes an artefact a person can open.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hrank.errors import HRankError  # noqa: E402

__all__ = ["HRankError", "__version__", "save", "load"]  # noqa: F822 (save/load: lazy, see __getattr__)


def __getattr__(name: str):
    """``hrank.save`` / ``hrank.load`` (weights + plan + metadata, no pickled modules), imported on first use
    so that ``import hrank`` stays light."""
    if name in ("save", "load"):
        from hrank import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'hrank' has no attribute {name!r}")
