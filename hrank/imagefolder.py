"""Image folders in the ImageNet layout (``ROOT/train/<class>/*.jpg``, ``ROOT/val/<class>/...``), streamed.

Files are listed once (sorted, so the order is deterministic) with torchvision's folder helpers; DataLoader
workers decode them (``torchvision.io.decode_image``) and crop them (``torchvision.transforms.v2``) into
uint8 CHW tensors, which are small to move; normalization and channels_last happen on the device in the
main process, as ``hrank.data.Batches`` does for in-memory sets. An image's random crop and flip depend only
on ``(seed, epoch, its position in the epoch's global order)``, so N DDP processes with batch B/N see
exactly the global batches one process with batch B sees, and a resumed run sees the batches it would have.
torchvision is imported lazily (``pip install 'hrank[vision]'``): importing hrank never needs it.
"""

from __future__ import annotations

import os
import re
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from hrank.data import Normalization, normalize
from hrank.errors import HRankError

if TYPE_CHECKING:
    from hrank.datasets import DataOptions

__all__ = ["FolderBatches", "FolderSplit", "RankImages", "check_root", "list_classes", "load_folders",
           "load_root"]

_NO_TORCHVISION = "image folders need torchvision: pip install 'hrank[vision]'"
_SPLITS = ("train", "val")  # ROOT/train is the training split; ROOT/val serves as the test split


def _torchvision() -> Any:
    """torchvision, or the one-line error saying how to install it."""
    try:
        import torchvision
        import torchvision.transforms.v2  # noqa: F401
    except Exception:
        raise HRankError(_NO_TORCHVISION) from None
    return torchvision


def _short(names: list[str], limit: int = 5) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def list_classes(folder: str | os.PathLike) -> list[str]:
    """The sorted class folder names of one split folder (reads directory entries only; no image)."""
    _torchvision()
    folder = Path(folder)
    if not folder.is_dir():
        raise HRankError(f"image folder not found: {folder} (expected ROOT/train/<class>/ and ROOT/val/<class>/)")
    # torchvision's find_classes, less hidden folders (a stray .ipynb_checkpoints is not a class)
    try:
        classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError as e:
        raise HRankError(f"cannot list {folder}: {e.strerror or type(e).__name__}") from None
    if not classes:
        raise HRankError(f"{folder} holds no class folders (expected {folder}/<class>/<image files>)")
    return classes


def check_root(root: str | os.PathLike) -> list[str]:
    """Cheap layout check (torchvision present, train/ and val/ with the same class folders); no image is read.

    Returns the class names. Runs before anything is written, so a bad folder fails a command up front.
    """
    _torchvision()
    root = Path(root).expanduser()
    if not root.is_dir():
        raise HRankError(f"image folder root not found: {root}")
    train, val = (list_classes(root / s) for s in _SPLITS)
    if train != val:
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        parts = ([f"only in train: {_short(only_train)}"] if only_train else []) + \
                ([f"only in val: {_short(only_val)}"] if only_val else [])
        raise HRankError(f"the class folders of {root}/train and {root}/val differ ({'; '.join(parts)})")
    return train


MAX_WORKERS = 256  # decoding processes per loader; more is a typo (10**6 would fork until the machine stops)


class FolderSplit:
    """One split of an image folder: sorted relative file paths and labels, plus the crop sizes (a ``Split``).

    Paths are kept as one numpy bytes array (compact, cheap to hand to DataLoader workers even for ImageNet's
    1.28M files); ``subset`` keeps the folder, the classes and the sizes.
    """

    def __init__(self, folder: str | os.PathLike, files: np.ndarray, labels: np.ndarray, classes: list[str], *,
                 name: str = "", image_size: int = 224, resize_size: int = 256, workers: int = 4) -> None:
        if image_size < 1 or resize_size < 1:
            raise HRankError(f"image sizes must be >= 1, got image_size={image_size}, resize_size={resize_size}")
        if not 0 <= workers <= MAX_WORKERS:
            raise HRankError(f"workers must be a whole number from 0 to {MAX_WORKERS}, got {workers}")
        self.folder = str(folder)
        self.files = files
        self.labels = labels
        self.classes = list(classes)
        self.name = name
        self.image_size = image_size
        self.resize_size = resize_size
        self.workers = workers

    @classmethod
    def from_folder(cls, folder: str | os.PathLike, *, name: str | None = None, image_size: int = 224,
                    resize_size: int = 256, workers: int = 4) -> FolderSplit:
        """List every image under ``folder/<class>/`` once, sorted by class then path (torchvision's rule)."""
        _torchvision()
        from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

        folder = Path(folder).expanduser()
        classes = list_classes(folder)
        samples = make_dataset(str(folder), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS,
                               allow_empty=True)
        counts = np.bincount(np.array([t for _, t in samples], dtype=np.int64), minlength=len(classes))
        empty = [c for c, k in zip(classes, counts, strict=True) if k == 0]
        if empty:
            raise HRankError(f"{folder}: no images in class folder{'s' if len(empty) > 1 else ''} {_short(empty)} "
                             f"(extensions: {' '.join(IMG_EXTENSIONS)})")
        files = np.array([os.fsencode(os.path.relpath(p, folder)) for p, _ in samples])
        labels = np.array([t for _, t in samples], dtype=np.int64)
        return cls(folder, files, labels, classes, name=name if name is not None else folder.name,
                   image_size=image_size, resize_size=resize_size, workers=workers)

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return f"FolderSplit({self.name!r}, {len(self)} images, {self.num_classes} classes, {self.folder})"

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def path(self, index: int) -> str:
        """The absolute path of image ``index``."""
        return os.path.join(self.folder, os.fsdecode(self.files[index]))

    def subset(self, indices: Any, name: str | None = None) -> FolderSplit:
        """The split over ``indices`` (in that order)."""
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64)
        return FolderSplit(self.folder, self.files[idx], self.labels[idx], self.classes,
                           name=self.name if name is None else name, image_size=self.image_size,
                           resize_size=self.resize_size, workers=self.workers)

    # -- the Split interface -------------------------------------------------------------------------------
    def train_batches(self, batch_size: int, *, normalization: Normalization | str | dict, device: torch.device,
                      seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False
                      ) -> FolderBatches:
        """Shuffled batches of ``batch_size`` per process, RandomResizedCrop + flip in the workers."""
        return FolderBatches(self, batch_size, normalization=normalization, train=True, device=device, seed=seed,
                             rank=rank, world_size=world_size, channels_last=channels_last)

    def eval_batches(self, batch_size: int, *, normalization: Normalization | str | dict, device: torch.device,
                     channels_last: bool = False) -> FolderBatches:
        """Every image once, in order: Resize(resize_size) + CenterCrop(image_size)."""
        return FolderBatches(self, min(batch_size, max(len(self), 1)), normalization=normalization, train=False,
                             device=device, channels_last=channels_last)

    def rank_input(self, *, augment: bool = True, seed: int = 0,
                   normalization: Normalization | str | dict | None = None) -> RankImages:
        """What ``compute_ranks`` takes: a Dataset of normalized float images in a seeded random order (its
        first N items are a seeded sample), training-augmented when ``augment`` (HRank ranks augmented
        training images); ``normalization`` defaults to "imagenet"."""
        return RankImages(self, augment=augment, seed=seed, normalization=normalization)


# -- decoding and transforms (run in the DataLoader workers) -------------------------------------------------

_DECODER: Any = None
_CXX_PREFIX = re.compile(r"^\w+, \S+\.cpp:\d+, ")  # "decode_image, /__w/.../decode_image.cpp:67, " in torchvision's


def _to_uint8(img: torch.Tensor) -> torch.Tensor:
    """16-bit images (PNG, TIFF) to 8 bits by their high byte, as torchvision's ``to_dtype(scale=True)`` does:
    hrank's normalization divides by 255, so a uint16 image would enter the network 257x too bright."""
    if img.dtype == torch.uint8:
        return img
    if img.dtype == torch.uint16:
        return (img.to(torch.int32) >> 8).to(torch.uint8)
    raise HRankError(f"unexpected image dtype {img.dtype}")


def _pil_decode(path: str) -> torch.Tensor:
    """PIL for what torchvision's decoder does not read (BMP, TIFF, PPM/PGM: all in torchvision's
    IMG_EXTENSIONS); 16-bit modes by their high byte (PIL's own convert("RGB") clips them to 255)."""
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
            a = np.asarray(im, dtype=np.int64)
            a = np.clip(a >> 8, 0, 255).astype(np.uint8)
            return torch.from_numpy(a)[None].expand(3, -1, -1).contiguous()
        a = np.array(im.convert("RGB"), dtype=np.uint8)  # a writable copy
    return torch.from_numpy(a).permute(2, 0, 1).contiguous()


def _first_line(e: BaseException) -> str:
    line = _CXX_PREFIX.sub("", (str(e).strip().splitlines() or [""])[0]).strip()
    return f"{type(e).__name__}{': ' + line[:160] if line else ''}"


def _decode(path: str) -> torch.Tensor:
    """Decode a file to uint8 RGB (3, H, W): ``torchvision.io.decode_image`` (libjpeg-turbo; 1.4x PIL's speed
    on 2026's 2-core VM, docs/benchmarks.md) for JPEG/PNG/WebP, PIL for the formats it does not read (BMP,
    TIFF, PPM/PGM) or where a torchvision no longer has it."""
    global _DECODER
    if _DECODER is None:
        try:
            from torchvision.io import ImageReadMode, decode_image, read_file

            # torchvision 0.29 deprecates its decoders for torchcodec; they work, and the warning came per image
            warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision",
                                    DeprecationWarning)
            _DECODER = lambda p: decode_image(read_file(p), mode=ImageReadMode.RGB)  # noqa: E731
        except ImportError:
            _DECODER = _pil_decode
    try:
        return _to_uint8(_DECODER(path))
    except Exception as first:
        if _DECODER is _pil_decode:
            raise
        try:
            return _to_uint8(_pil_decode(path))
        except Exception as second:
            if not os.path.isfile(path):
                raise first from None
            if "Unsupported image file" in str(first):  # torchvision cannot read the format: PIL's word counts
                raise second from None
            raise first from None


class _Images(Dataset):
    """Decodes and crops one image per key ``(index, item_seed)``: seed None is the evaluation transform,
    otherwise the training transform runs under that seed (and leaves the process's RNG untouched)."""

    def __init__(self, split: FolderSplit) -> None:
        tv = _torchvision()
        v2 = tv.transforms.v2
        self.folder, self.files, self.labels = split.folder, split.files, split.labels
        self.train_tf = v2.Compose([v2.RandomResizedCrop(split.image_size, antialias=True),
                                    v2.RandomHorizontalFlip()])
        self.eval_tf = v2.Compose([v2.Resize(split.resize_size, antialias=True), v2.CenterCrop(split.image_size)])

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> torch.Tensor:
        """Image ``index`` as uint8 RGB (3, H, W); an unreadable file is a one-line error naming it."""
        path = os.path.join(self.folder, os.fsdecode(self.files[index]))
        try:
            return _decode(path)
        except HRankError:
            raise
        except Exception as e:
            raise HRankError(f"cannot decode image {path}: {_first_line(e)}") from None

    def transform(self, img: torch.Tensor, item_seed: int | None) -> torch.Tensor:
        if item_seed is None:
            return self.eval_tf(img)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed)
            return self.train_tf(img)

    def __getitem__(self, key: tuple[int, int | None]) -> tuple[torch.Tensor, int]:
        index, item_seed = key
        return self.transform(self.load(index), item_seed).contiguous(), int(self.labels[index])


def _epoch_seed(seed: int, epoch: int) -> int:
    """The seed of an epoch's order (the same formula as ``hrank.data.Batches``)."""
    return seed * 1_000_003 + epoch


def item_seeds(seed: int, epoch: int, n: int) -> torch.Tensor:
    """One augmentation seed per position of the epoch's global order, from ``(seed, epoch)`` only."""
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch) + 7_777_777)
    return torch.randint(0, 2**62, (n,), generator=g, dtype=torch.int64)


class _EpochKeys:
    """The DataLoader's batch sampler: this rank's batches of ``(index, item_seed)`` keys for the current
    epoch of its FolderBatches (re-read at every ``iter``, so persistent workers follow ``set_epoch``)."""

    def __init__(self, owner: FolderBatches) -> None:
        # weakly: a cycle owner -> loader -> sampler -> owner would keep dropped loaders' workers alive until a
        # garbage collection, and workers forked meanwhile would inherit (and fail to shut down) them
        self.owner = weakref.ref(owner)

    def _get(self) -> FolderBatches:
        owner = self.owner()
        if owner is None:
            raise RuntimeError("the FolderBatches of this DataLoader is gone")
        return owner

    def __len__(self) -> int:
        return len(self._get())

    def __iter__(self) -> Iterator[list[tuple[int, int | None]]]:
        return iter(self._get().key_batches())


class FolderBatches:
    """Iterate ``(images, labels)`` batches of a FolderSplit, normalized on ``device`` (DataLoader inside).

    Same contract as ``hrank.data.Batches``: the epoch's global order is a seeded permutation of
    ``(seed, epoch)``; process ``rank`` of ``world_size`` takes positions ``rank::world_size`` of it (padded by
    repetition when not dropping the last batch); every image's crop and flip depend on its global position
    only. ``len`` is the number of batches per epoch (the last partial batch dropped when training).
    """

    def __init__(self, data: FolderSplit, batch_size: int, *, normalization: Normalization | str | dict = "imagenet",
                 train: bool = False, shuffle: bool | None = None, drop_last: bool | None = None,
                 device: torch.device | str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32, workers: int | None = None) -> None:
        if batch_size < 1:
            raise HRankError(f"batch size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise HRankError(f"dataset {data.name or ''} is empty".replace("  ", " "))
        if not 0 <= rank < world_size:
            raise HRankError(f"rank {rank} is not in [0, {world_size})")
        self.data = data
        self.batch_size = batch_size
        self.norm = Normalization.get(normalization)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(data) // world_size < batch_size:
            raise HRankError(f"batch size {batch_size} is larger than the dataset "
                             f"({len(data)} images{' per process' if world_size > 1 else ''})")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.workers = data.workers if workers is None else workers
        self.epoch = 0
        self._loader: DataLoader | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> FolderBatches:
        """Unshuffled batches over this process's contiguous slice of the images (sharded evaluation)."""
        n = len(self.data)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        if hi <= lo:
            raise HRankError(f"evaluation set of {n} images is smaller than the {world_size} processes")
        part = self.data.subset(np.arange(lo, hi), self.data.name)
        return FolderBatches(part, min(self.batch_size, hi - lo), normalization=self.norm, train=False,
                             device=self.device, channels_last=self.channels_last, dtype=self.dtype,
                             workers=self.workers)

    def _positions(self) -> tuple[torch.Tensor, slice]:
        """The epoch's global order (padded so every rank gets as many) and this rank's slice of it."""
        n = len(self.data)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        if self.world_size == 1:
            return order, slice(None)
        per = n // self.world_size if self.drop_last else -(-n // self.world_size)
        if per * self.world_size > n:  # pad by repeating, as DistributedSampler does
            order = torch.cat([order, order[: per * self.world_size - n]])
        return order, slice(self.rank, per * self.world_size, self.world_size)

    def _count(self) -> int:
        n = len(self.data)
        if self.world_size == 1:
            return n
        return n // self.world_size if self.drop_last else -(-n // self.world_size)

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch."""
        n = self._count()
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = self._count()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def key_batches(self) -> list[list[tuple[int, int | None]]]:
        """This rank's batches of ``(image index, augmentation seed or None)`` for the current epoch."""
        full, mine = self._positions()
        order = full[mine].tolist()
        seeds = item_seeds(self.seed, self.epoch, len(full))[mine].tolist() if self.train else [None] * len(order)
        b = self.batch_size
        return [list(zip(order[i * b:(i + 1) * b], seeds[i * b:(i + 1) * b], strict=True)) for i in range(len(self))]

    def loader(self) -> DataLoader:
        """The DataLoader (built once, so persistent workers live across epochs)."""
        if self._loader is None:
            w = self.workers
            self._loader = DataLoader(
                _Images(self.data), batch_sampler=_EpochKeys(self), num_workers=w,
                pin_memory=self.device.type == "cuda", persistent_workers=w > 0,
                # its own generator: creating an iterator must not draw from the global RNG (bit-exact resume)
                generator=torch.Generator().manual_seed(0))
        return self._loader

    def close(self) -> None:
        """Stop the DataLoader's persistent workers now (they also stop when this object is dropped)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            for imgs, labels in self.loader():
                x = normalize(imgs.to(self.device, non_blocking=True), self.norm, self.dtype)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                yield x, labels.to(self.device, non_blocking=True)
        except HRankError as e:  # from a worker: its message carries the worker's traceback; keep the last line
            last = str(e).strip().splitlines()[-1]
            raise HRankError(last.split("HRankError: ", 1)[-1]) from None


class RankImages(Dataset):
    """A FolderSplit in a seeded random order as normalized float images ``(image, label)`` for
    ``compute_ranks`` (which takes the first N items): deterministic per index for a seed."""

    def __init__(self, split: FolderSplit, *, augment: bool = True, seed: int = 0,
                 normalization: Normalization | str | dict | None = None) -> None:
        self.images = _Images(split)
        self.augment = augment
        self.seed = seed
        self.norm = Normalization.get(normalization if normalization is not None else "imagenet")
        g = torch.Generator().manual_seed(seed)
        self.order = torch.randperm(len(split), generator=g).tolist()
        self.seeds = torch.randint(0, 2**62, (len(split),), generator=g, dtype=torch.int64).tolist()

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.images[(self.order[i], self.seeds[i] if self.augment else None)]
        return normalize(img[None], self.norm)[0], label


# -- the ``imagefolder`` dataset (registered in hrank.datasets) ----------------------------------------------

def load_root(root: str | os.PathLike, *, image_size: int = 224, resize_size: int = 256,
              workers: int = 4) -> tuple[FolderSplit, FolderSplit]:
    """(ROOT/train, ROOT/val) as FolderSplits; val is the test split (validation is carved from train)."""
    root = Path(root).expanduser()
    check_root(root)
    train, val = (FolderSplit.from_folder(root / s, name=f"{root.name}-{s}", image_size=image_size,
                                          resize_size=resize_size, workers=workers) for s in _SPLITS)
    return train, val


def check_folders(opts: DataOptions) -> None:
    """The registry's ``check``: layout and torchvision, no image read."""
    check_root(opts.data_dir())


def load_folders(opts: DataOptions) -> tuple[FolderSplit, FolderSplit]:
    """The registry's ``load``: the train and test (val/) splits with the options' sizes and workers."""
    return load_root(opts.data_dir(), image_size=opts.image_size, resize_size=opts.resize_size,
                     workers=opts.workers)
