"""Small helpers shared by the CLI commands: devices, tables, common flags."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Callable

from hrank.distributed import resolve_device  # noqa: F401 - the commands' device flag


def format_table(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """A plain-text table; numbers right-aligned, text left-aligned (or per ``align``: 'l'/'r' per column)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if align is None:
        align = "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l" for i in range(len(headers)))
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align,
                                                                                         strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")


def int_at_least(low: int, high: int = (1 << 63) - 1) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers in [``low``, ``high``] (by default what a 64-bit seed or count
    holds), so a bad value fails before any work starts."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        if value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def finite_float(text: str) -> float:
    """An argparse ``type`` for finite numbers (no nan, no inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


NONNEG_INT = int_at_least(0)
POSITIVE_INT = int_at_least(1)
NUM_CLASSES = int_at_least(1, 1_000_000)  # the largest classifier hrank builds (models.MAX_CLASSES)
WORKERS = int_at_least(0, 256)  # decoding processes per loader (imagefolder.MAX_WORKERS)


def add_data_args(p: argparse.ArgumentParser, *, default_dataset: str = "cifar10") -> None:
    from hrank import datasets

    p.add_argument("--dataset", default=default_dataset, choices=datasets.names(),
                   help="dataset (default %(default)s); imagefolder: DATA_DIR/train and DATA_DIR/val with one "
                        "folder per class (ImageNet layout)")
    p.add_argument("--data-dir", default=os.environ.get("HRANK_DATA", "data"),
                   help="folder holding the dataset (default: $HRANK_DATA or ./data); CIFAR is downloaded "
                        "there when absent and a network is available")
    p.add_argument("--no-download", action="store_true", help="never download; fail if the data is absent")
    p.add_argument("--image-size", type=POSITIVE_INT, default=224,
                   help="image folders: training and evaluation crop size (default %(default)s)")
    p.add_argument("--resize-size", type=POSITIVE_INT, default=256,
                   help="image folders: evaluation resize before the centre crop (default %(default)s)")
    p.add_argument("--workers", type=WORKERS, default=4,
                   help="image folders: decoding processes per data loader (default %(default)s)")
