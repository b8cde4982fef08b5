"""The dataset registry: every dataset the pipeline, the CLI and the config accept, and the one place where
a dataset's splits are made (validation carved from train, training subset, test subset).

A dataset is one :class:`DatasetSpec` registered here: ``check`` (cheap, before anything is written: files
present, extras installed) and ``load`` (the whole train and test splits as :class:`hrank.data.Split`\\ s).
Adding a dataset is one module with those two functions plus one ``register`` call.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hrank.data import Split
from hrank.errors import HRankError


@dataclass(frozen=True)
class DataOptions:
    """Where the data is and how to cut it; the config keys of the same names."""

    root: str | os.PathLike | None = None  # the data directory (default: $HRANK_DATA or ./data)
    download: bool = True  # CIFAR only: fetch the official archive when absent
    val_size: int | None = None  # images carved from train for model selection (None: the dataset's default)
    seed: int = 0  # seeds the validation split and the training subset
    train_subset: int | None = None  # fine-tune on a seeded subset of the training split
    test_subset: int | None = None  # evaluate on the first N test images
    image_size: int = 224  # image folders: the training crop and the evaluation crop
    resize_size: int = 256  # image folders: the evaluation resize before the centre crop
    workers: int = 4  # image folders: decoding processes per DataLoader

    def data_dir(self) -> Path:
        from hrank.data import default_data_dir

        return Path(self.root).expanduser() if self.root else default_data_dir()


@dataclass
class DataSplits:
    """The splits every pipeline step draws from."""

    train: Split  # the training images after the validation split: ranks and BN recalibration
    finetune: Split  # what fine-tuning trains on: ``train`` or a seeded subset of it
    val: Split | None  # carved from the training set; None when val_size is 0
    test: Split  # the test (ImageNet: val) split, or its first test_subset images
    normalization: str  # the dataset's usual input normalization (a name in hrank.data.NORMALIZATIONS)
    input_size: tuple[int, int, int]  # (C, H, W) of the images the model sees

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset."""

    name: str
    description: str
    check: Callable[[DataOptions], None]  # raises HRankError; reads no images
    load: Callable[[DataOptions], tuple[Split, Split]]  # the whole train and test splits
    normalization: str
    input_size: Callable[[DataOptions], tuple[int, int, int]]
    default_val_size: Callable[[int], int]  # from the number of training images


_REGISTRY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
    """Make a dataset available under ``spec.name`` (to ``hrank run``'s ``dataset`` key and the CLI)."""
    _REGISTRY[spec.name] = spec
    return spec


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> DatasetSpec:
    if name not in _REGISTRY:
        raise HRankError(f"unknown dataset {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def check(name: str, opts: DataOptions) -> None:
    """Everything about the data that can be checked before anything is loaded or written."""
    get(name).check(opts)


def load(name: str, opts: DataOptions) -> DataSplits:
    """The dataset's splits, cut the one way every command cuts them (seeded, see ``DataOptions``)."""
    spec = get(name)
    spec.check(opts)
    train_all, test = spec.load(opts)
    val_size = spec.default_val_size(len(train_all)) if opts.val_size is None else opts.val_size
    if val_size >= len(train_all):
        raise HRankError(f"val_size {val_size} leaves no training images ({len(train_all)} in total)")
    train, val = carve_val(train_all, val_size, opts.seed)
    finetune = pick_subset(train, opts.train_subset, opts.seed)
    if opts.test_subset is not None and opts.test_subset < len(test):
        test = test.subset(np.arange(opts.test_subset), f"{test.name}[:{opts.test_subset}]")
    return DataSplits(train, finetune, val, test, spec.normalization, spec.input_size(opts))


def carve_val(train: Split, val_size: int, seed: int) -> tuple[Split, Split | None]:
    """A seeded validation split of ``val_size`` images out of ``train`` (none for 0)."""
    if val_size == 0:
        return train, None
    from hrank.data import train_val_split

    tr, va = train_val_split(len(train), val_size, seed)
    return train.subset(tr, f"{train.name}[train]"), train.subset(va, f"{train.name}[val]")


def pick_subset(train: Split, size: int | None, seed: int) -> Split:
    """The seeded training subset of ``size`` images (all of ``train`` when ``size`` is None or larger)."""
    if size is None or size >= len(train):
        return train
    if size < 1:
        raise HRankError(f"train_subset must be >= 1, got {size}")
    pick = np.sort(np.random.default_rng(seed + 1).permutation(len(train))[:size])
    return train.subset(pick, f"{train.name}[subset]")


# -- CIFAR-10/100: the official python batches, in memory ------------------------------------------------------

def _cifar(name: str) -> DatasetSpec:
    def check_(opts: DataOptions) -> None:
        from hrank.data import check_cifar

        check_cifar(opts.data_dir(), name, download=opts.download)

    def load_(opts: DataOptions) -> tuple[Any, Any]:
        from hrank.data import load_cifar

        return (load_cifar(opts.data_dir(), name, "train", download=opts.download),
                load_cifar(opts.data_dir(), name, "test", download=opts.download))

    return DatasetSpec(name, f"{name.upper()} python batches (downloaded when absent)", check_, load_, "cifar",
                       lambda opts: (3, 32, 32), lambda n: min(5000, n // 10))


register(_cifar("cifar10"))
register(_cifar("cifar100"))


# -- image folders in the ImageNet layout (ROOT/train/<class>/, ROOT/val/<class>/), streamed: hrank.imagefolder --

def _imagefolder() -> DatasetSpec:
    def check_(opts: DataOptions) -> None:
        from hrank.imagefolder import check_folders  # lazily: torchvision is only needed for this dataset

        check_folders(opts)

    def load_(opts: DataOptions) -> tuple[Any, Any]:
        from hrank.imagefolder import load_folders

        return load_folders(opts)

    # validation: 5% of train, at most 10,000 images (ImageNet: 10k of 1.28M, a top-1 standard error of
    # ~0.4 points, evaluated in ~1% of an epoch; a small folder keeps 95% of its images for training)
    return DatasetSpec("imagefolder", "ROOT/train/<class>/ and ROOT/val/<class>/ image folders (ImageNet layout; "
                       "val is the test split; needs torchvision)", check_, load_, "imagenet",
                       lambda opts: (3, opts.image_size, opts.image_size), lambda n: min(10000, n // 20))


register(_imagefolder())


def _alias(name: str, spec: DatasetSpec) -> DatasetSpec:
    """The same dataset under another name (``imagenet``: the ImageNet folders are an image folder)."""
    return DatasetSpec(name, f"{spec.description} (alias of {spec.name})", spec.check, spec.load,
                       spec.normalization, spec.input_size, spec.default_val_size)


register(_alias("imagenet", get("imagefolder")))
