"""Shared fixtures: tiny generated CIFAR batch files, the real CIFAR-10 copy when HRANK_CIFAR10 is set."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

# two threads (CI's cores), or what OMP_NUM_THREADS asks for on a busy machine
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1, int(os.environ.get("OMP_NUM_THREADS") or 2))))

# Golden data from the official HRank repository (copied from ../shared/reference; see its README).
REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def copy_run(finished: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A private copy of a module's shared finished run, so a test may damage it: (run dir, data dir)."""
    out, data = finished
    shutil.copytree(out, tmp_path / "run")
    return tmp_path / "run", data


def write_cifar(root: Path, n_train: int = 64, n_test: int = 32, num_classes: int = 10, seed: int = 0,
                folder: str = "cifar-10-batches-py") -> Path:
    """Write a small CIFAR-10-format folder (5 train batches + test batch + meta) and return its parent."""
    rng = np.random.default_rng(seed)
    d = root / folder
    d.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        per = n_train // 5 + (1 if i <= n_train % 5 else 0)
        data = rng.integers(0, 256, size=(per, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, num_classes, size=per)]
        with open(d / f"data_batch_{i}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"train"}, f, protocol=2)
    data = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    labels = [int(x) for x in rng.integers(0, num_classes, size=n_test)]
    with open(d / "test_batch", "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"test"}, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(num_classes)]}, f, protocol=2)
    return root


@pytest.fixture
def tiny_cifar(tmp_path: Path) -> Path:
    """A data dir with 64 random train and 32 random test images in CIFAR-10 format."""
    return write_cifar(tmp_path / "data")


@pytest.fixture
def cifar_sets(tiny_cifar: Path):
    """(train, val, test) ImageSets of the tiny CIFAR folder, 16 training images held out for validation."""
    from hrank import train
    from hrank.data import load_cifar

    with pytest.warns(UserWarning):
        full = load_cifar(tiny_cifar, "cifar10", "train", download=False)
    with pytest.warns(UserWarning):
        test = load_cifar(tiny_cifar, "cifar10", "test", download=False)
    tr, va = train.split_train_val(full, 16, seed=0)
    return tr, va, test


@pytest.fixture(scope="session")
def real_cifar10() -> Path:
    """The real CIFAR-10 copy (HRANK_CIFAR10 points at the folder holding cifar-10-batches-py)."""
    path = os.environ.get("HRANK_CIFAR10")
    if not path:
        pytest.skip("HRANK_CIFAR10 not set (integration test)")
    return Path(path)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """Golden data from the official repository, vendored under tests/data/reference."""
    return REFERENCE


@pytest.fixture(scope="session")
def pretrained_resnet56() -> Path:
    """The pretrained CIFAR ResNet-56 (HRANK_WEIGHTS points at the folder holding resnet56-*.th)."""
    path = os.environ.get("HRANK_WEIGHTS")
    if not path:
        pytest.skip("HRANK_WEIGHTS not set (integration test)")
    found = sorted(Path(path).glob("resnet56-*.th"))
    if not found:
        pytest.skip(f"no resnet56-*.th in {path}")
    return found[0]
