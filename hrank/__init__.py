"""hrank: HRank filter pruning for PyTorch CNNs.

Pipeline: data -> models -> ranks -> spec/plan -> prune -> train -> report/export. Each step has its own
module and writes an artefact a person can open.
"""

from __future__ import annotations

__version__ = "0.1.0"

from hrank.errors import HRankError  # noqa: E402

__all__ = ["HRankError", "__version__"]
