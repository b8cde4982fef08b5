"""CIFAR-10/100 from the official python batch files (no torchvision), device-side augmentation, splits.

The whole uint8 dataset is moved to the training device once; every batch is cropped, flipped and
normalized there, so data loading never limits training. ImageNet goes through torchvision (``vision``
extra).
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import tarfile
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from hrank.errors import HRankError

NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # HRank's CIFAR statistics (transforms.Normalize in the official code)
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # ImageNet statistics; also what the pretrained CIFAR ResNets in shared/data/weights were trained with
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def _is_mean_std(mean: Any, std: Any) -> bool:
    """Per-channel mean and std: lists of the same (non-zero) length of finite numbers, every std > 0."""
    def finite(v: Any) -> bool:
        return (isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
                and math.isfinite(v))

    return (isinstance(mean, (list, tuple)) and isinstance(std, (list, tuple)) and len(mean) == len(std) > 0
            and all(finite(v) for v in mean) and all(finite(v) and v > 0 for v in std))


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean/std applied to [0, 1] images; stored with every checkpoint hrank writes."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = "custom"

    @staticmethod
    def get(name_or_obj: str | Normalization | dict | None) -> Normalization:
        """Resolve a preset name ("cifar", "imagenet"), a dict from a checkpoint, or an instance."""
        if isinstance(name_or_obj, Normalization):
            return name_or_obj
        if isinstance(name_or_obj, dict):
            mean, std = name_or_obj.get("mean"), name_or_obj.get("std")
            if not _is_mean_std(mean, std):
                raise HRankError("a normalization needs mean and std: lists of finite numbers of the same length "
                                 "(std > 0)")
            return Normalization(tuple(mean), tuple(std), name_or_obj.get("name", "custom"))
        name = name_or_obj or "cifar"
        if name not in NORMALIZATIONS:
            raise HRankError(f"unknown normalization {name!r}; choose one of {', '.join(NORMALIZATIONS)}")
        mean, std = NORMALIZATIONS[name]
        return Normalization(mean, std, name)

    def to_json(self) -> dict:
        return {"name": self.name, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class _Source:
    archive: str
    url: str
    md5: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    meta_file: str
    names_key: bytes
    num_classes: int


SOURCES = {
    "cifar10": _Source("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                       "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py",
                       tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), b"labels",
                       "batches.meta", b"label_names", 10),
    "cifar100": _Source("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python", ("train",), ("test",),
                        b"fine_labels", "meta", b"fine_label_names", 100),
}
EXPECTED_COUNTS = {"train": 50000, "test": 10000}


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, H, W) and labels as int64 (N,), on CPU or on the training device."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, indices: torch.Tensor | np.ndarray | list[int], name: str | None = None) -> ImageSet:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageSet(self.images[idx.to(self.images.device)], self.labels[idx.to(self.labels.device)],
                        self.classes, name or self.name)

    def to(self, device: torch.device | str) -> ImageSet:
        return ImageSet(self.images.to(device), self.labels.to(device), self.classes, self.name)

    # -- the Split interface (see ``Split``): how the pipeline draws batches from any dataset ------------------
    def train_batches(self, batch_size: int, *, normalization: Normalization | str | dict, device: torch.device,
                      seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False) -> Batches:
        """Shuffled, augmented (pad-4 crop + flip, on ``device``) batches of ``batch_size`` per process."""
        return Batches(self, batch_size, normalization=normalization, train=True, device=device, seed=seed,
                       rank=rank, world_size=world_size, channels_last=channels_last)

    def eval_batches(self, batch_size: int, *, normalization: Normalization | str | dict, device: torch.device,
                     channels_last: bool = False) -> Batches:
        """Every image once, in order, unaugmented."""
        return Batches(self, min(batch_size, len(self)), normalization=normalization, train=False, device=device,
                       channels_last=channels_last)

    def rank_input(self, *, augment: bool = True, seed: int = 0,
                   normalization: Normalization | str | dict | None = None) -> ImageSet:
        """What ``compute_ranks`` takes: the ImageSet itself (it draws, augments and normalizes on its own,
        from the same ``augment``/``seed``/``normalization`` passed to it)."""
        return self


class Split(Protocol):
    """One split of a dataset, as the pipeline uses it (``ImageSet`` in memory; image folders stream).

    ``train_batches``/``eval_batches`` return iterables of ``(images, labels)`` on the device, already
    normalized, with ``len``, ``set_epoch(e)``, ``shard(rank, world)`` (a disjoint contiguous slice for
    sharded evaluation) and the attributes ``data`` (the split), ``batch_size``, ``world_size``, ``norm``,
    ``train``. Training order and augmentation depend only on ``(seed, epoch)`` and an image's place in the
    global order, so N processes see the batches one process sees.
    """

    name: str

    def __len__(self) -> int: ...

    @property
    def num_classes(self) -> int: ...

    def subset(self, indices: Any, name: str | None = None) -> Split: ...

    def train_batches(self, batch_size: int, *, normalization: Normalization | str | dict, device: torch.device,
                      seed: int = 0, rank: int = 0, world_size: int = 1, channels_last: bool = False) -> Any: ...

    def eval_batches(self, batch_size: int, *, normalization: Normalization | str | dict, device: torch.device,
                     channels_last: bool = False) -> Any: ...

    def rank_input(self, *, augment: bool = True, seed: int = 0,
                   normalization: Normalization | str | dict | None = None) -> Any: ...


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle may name, each wrapped to admit plain (non-object) data.

    numpy arrays pickle as ``_reconstruct(ndarray, shape, typecode)`` + ``dtype(...)`` (protocols 2-4) or
    ``_frombuffer(buffer, dtype, shape, order)`` (protocol 5); numpy scalars as ``scalar(dtype, bytes)``;
    Python 3's protocol 2 writes ``bytes`` as ``_codecs.encode(text, 'latin1')``. numpy 1.x names them
    under ``numpy.core``, numpy 2 under ``numpy._core``.
    """
    reconstruct = np.ndarray.__reduce__(np.zeros(1))[0]
    frombuffer = np.ndarray.__reduce_ex__(np.zeros(1), 5)[0]
    scalar = np.int64(0).__reduce__()[0]

    def plain(dt: np.dtype) -> np.dtype:
        if not isinstance(dt, np.dtype) or dt.hasobject:
            raise _Refused(f"it holds a numpy array of dtype {dt!r}; only plain numeric/byte dtypes are allowed")
        return dt

    def make_dtype(spec: Any, align: bool = False, copy: bool = True) -> np.dtype:
        if not isinstance(spec, str) or spec.startswith("O"):
            raise _Refused(f"it holds a numpy dtype {spec!r}; only plain numeric/byte dtypes are allowed")
        return np.dtype(spec, bool(align), bool(copy))

    def make_array(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
        if subtype is not np.ndarray:
            raise _Refused(f"it holds an array of type {subtype!r}")
        return reconstruct(np.ndarray, shape, typecode)

    def make_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        if not isinstance(buf, (bytes, bytearray, pickle.PickleBuffer)):
            raise _Refused(f"it holds an array buffer of type {type(buf).__name__}")
        return frombuffer(buf, plain(dtype), shape, order)

    def make_scalar(dtype: Any, data: Any = None) -> Any:
        if not isinstance(data, bytes):
            raise _Refused("it holds a numpy scalar without raw bytes")
        return scalar(plain(dtype), data)

    def encode(text: Any, encoding: str = "utf-8") -> bytes:
        if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
            raise _Refused(f"it calls _codecs.encode with {type(text).__name__}, {encoding!r}")
        return text.encode("latin-1")

    table: dict[tuple[str, str], Any] = {("_codecs", "encode"): encode, ("numpy", "ndarray"): np.ndarray,
                                         ("numpy", "dtype"): make_dtype}
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = make_array
        table[(f"{core}.multiarray", "scalar")] = make_scalar
        table[(f"{core}.numeric", "_frombuffer")] = make_frombuffer
    return table


class _Refused(Exception):
    """Something a CIFAR batch never holds; loading it could run code, so the file is refused."""


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals a CIFAR batch needs (numpy arrays of plain dtypes)."""

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if _BatchUnpickler._allowed is None:
            _BatchUnpickler._allowed = _numpy_globals()
        try:
            return _BatchUnpickler._allowed[(module, name)]
        except KeyError:
            module = "builtins" if module == "__builtin__" else module  # Python 2's name (protocol 2)
            raise _Refused(f"it names {module}.{name}, which a CIFAR batch never holds (unpickling it could run "
                          "code)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise _Refused("it holds persistent ids: a PyTorch file or another format, not a CIFAR batch")


_PLAIN = (str, bytes, int, float, bool, type(None))


def _check_plain(obj: Any, depth: int = 0) -> None:
    """Everything in a loaded batch is a dict, list, tuple, str/bytes, number or a plain numpy array/scalar."""
    if depth > 20:
        raise _Refused("it holds data nested deeper than a CIFAR batch")
    if isinstance(obj, _PLAIN):
        return
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.hasobject:
            raise _Refused(f"it holds a numpy array of dtype {obj.dtype}; only plain dtypes are allowed")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for v in obj:
            if not isinstance(v, _PLAIN):
                _check_plain(v, depth + 1)
        return
    raise _Refused(f"it holds an object of type {type(obj).__name__}, which a CIFAR batch never does")


def load_batch_pickle(path: str | os.PathLike) -> dict:
    """Unpickle a CIFAR batch file with an unpickler that admits only dicts, lists, strings, numbers and
    numpy arrays of plain dtypes, so a crafted file cannot run code; anything else is a one-line error."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
            if not head:
                raise HRankError(f"CIFAR batch file {path} is empty")
            if head.startswith(b"PK"):
                raise HRankError(f"{path} is not a CIFAR batch file (it is a zip archive: a PyTorch or .npz file?)")
            f.seek(0)
            obj = _BatchUnpickler(f, encoding="bytes").load()
        _check_plain(obj)
    except HRankError:
        raise
    except _Refused as e:
        raise HRankError(f"refused to read CIFAR batch file {path}: {e}") from None
    except Exception as e:  # truncated, not a pickle, recursion, memory
        text = str(e).strip().splitlines()
        raise HRankError(f"cannot read CIFAR batch file {path}: {type(e).__name__}"
                         + (f": {text[0][:200]}" if text else "")) from None
    if not isinstance(obj, dict):
        raise HRankError(f"{path} is not a CIFAR batch file (it holds a {type(obj).__name__}, not a dict)")
    return obj



def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _find_folder(data_dir: Path, src: _Source) -> Path | None:
    for cand in (data_dir / src.folder, data_dir):
        if all((cand / f).exists() for f in src.train_files + src.test_files):
            return cand
    return None


def check_cifar(data_dir: str | os.PathLike, dataset: str = "cifar10", *, download: bool = True) -> Path | None:
    """The folder holding ``dataset``'s batch files under ``data_dir`` (None: absent, to be downloaded).

    Cheap (no file is read), so that a command can fail before it writes anything when the data is
    missing and may not be downloaded.
    """
    if dataset not in SOURCES:
        raise HRankError(f"unknown dataset {dataset!r}; choose one of {', '.join(SOURCES)}")
    src = SOURCES[dataset]
    data_dir = Path(data_dir).expanduser()
    folder = _find_folder(data_dir, src)
    if folder is None and not download:
        raise HRankError(f"{dataset} not found in {data_dir} (expected {src.folder}/ with "
                         f"{', '.join(src.train_files + src.test_files)}); download it or pass --data-dir")
    return folder


def download_cifar(data_dir: str | os.PathLike, dataset: str = "cifar10") -> Path:
    """Download and unpack the official archive into ``data_dir``, verifying its MD5 checksum."""
    src = SOURCES[dataset]
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    archive = data_dir / src.archive
    if not archive.exists() or _md5(archive) != src.md5:  # absent, partial or tampered with: fetch it again
        tmp = archive.with_suffix(".part")
        try:
            print(f"downloading {src.url} to {data_dir} ...", flush=True)
            urllib.request.urlretrieve(src.url, tmp)
        except Exception as e:
            if tmp.exists():
                tmp.unlink()
            raise HRankError(
                f"{dataset} not found in {data_dir} and the download failed ({type(e).__name__}); put the "
                f"official '{src.folder}' folder (python version) there or pass --data-dir / set HRANK_DATA"
            ) from None
        if _md5(tmp) != src.md5:
            tmp.unlink()
            raise HRankError(f"downloaded {src.archive} has the wrong MD5 checksum; try again")
        os.replace(tmp, archive)
    extract_archive(archive, data_dir)  # only ever an archive whose checksum was verified just above
    return data_dir / src.folder


def extract_archive(archive: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Unpack a .tar.gz into ``dest`` safely: only regular files and directories, none outside ``dest``
    (checked here, and by tarfile's ``data`` filter where this Python has it)."""
    dest = Path(dest).resolve()
    with tarfile.open(archive, "r:*") as tar:
        members = tar.getmembers()
        for m in members:
            target = (dest / m.name).resolve()
            if not (m.isfile() or m.isdir()):
                raise HRankError(f"refused to extract {archive}: {m.name!r} is not a regular file or directory")
            if Path(m.name).is_absolute() or ".." in Path(m.name).parts or not target.is_relative_to(dest):
                raise HRankError(f"refused to extract {archive}: {m.name!r} points outside {dest}")
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, members=members, filter="data")
        else:  # pragma: no cover - Python without extraction filters; every member was checked above
            tar.extractall(dest, members=members)


def load_cifar(data_dir: str | os.PathLike, dataset: str = "cifar10", split: str = "train", *,
               download: bool = True, strict_counts: bool = False) -> ImageSet:
    """Load the CIFAR-10/100 ``train`` or ``test`` split from official python batch files.

    Files whose checksums differ from the official ones (such as a JPEG-derived copy) are accepted;
    shapes, label ranges and counts are validated instead (a count other than the official 50,000/10,000
    is an error with ``strict_counts``, else a warning, so small local subsets still work). With
    ``download`` and no files, the official archive is fetched and its checksum verified.
    """
    if split not in ("train", "test"):
        raise HRankError(f"unknown split {split!r}; choose train or test")
    folder = check_cifar(data_dir, dataset, download=download)
    src = SOURCES[dataset]
    data_dir = Path(data_dir).expanduser()
    if folder is None:
        folder = download_cifar(data_dir, dataset)
    files = src.train_files if split == "train" else src.test_files
    return load_batch_files([folder / f for f in files], src.num_classes, label_key=src.label_key,
                            meta=folder / src.meta_file, names_key=src.names_key,
                            expected=EXPECTED_COUNTS[split], strict_counts=strict_counts,
                            name=f"{dataset}-{split}")


def _int_labels(path: Path, labs: Any, num_classes: int) -> np.ndarray:
    """A batch file's labels as int64: a flat list of integers (or integer-valued floats) in 0..num_classes-1."""
    try:
        arr = np.asarray(labs)
    except (TypeError, ValueError):  # ragged nested lists
        arr = None
    if arr is None or arr.ndim != 1:
        raise HRankError(f"{path}: labels must be a flat list of integers")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.dtype.kind == "f":
        whole = np.isfinite(arr) & (arr == np.round(arr))
        if not whole.all():
            raise HRankError(f"{path}: labels must be integers, found {float(arr[~whole][0])}")
    elif arr.dtype.kind not in "iu":
        what = "text" if arr.dtype.kind in "US" else ("true/false" if arr.dtype.kind == "b" else "non-numbers")
        raise HRankError(f"{path}: labels must be integers, found {what}")
    if arr.min() < 0 or arr.max() >= num_classes:
        raise HRankError(f"{path}: labels outside 0..{num_classes - 1}")
    return arr.astype(np.int64)


def load_batch_files(paths: list[Path], num_classes: int, *, label_key: bytes = b"labels",
                     meta: Path | None = None, names_key: bytes = b"label_names",
                     expected: int | None = None, strict_counts: bool = True, name: str = "") -> ImageSet:
    """Read CIFAR-format pickles (``data`` N x 3072 uint8, labels list) into an ImageSet, validating them."""
    images, labels = [], []
    for p in paths:
        d = load_batch_pickle(p)
        data = d.get(b"data", d.get("data"))
        labs = d.get(label_key, d.get(label_key.decode()))
        if data is None or labs is None:
            raise HRankError(f"{p} is not a CIFAR batch file (no data/{label_key.decode()} entries)")
        data = np.asarray(data)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise HRankError(f"{p}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
        labs = _int_labels(p, labs, num_classes)
        if labs.shape[0] != data.shape[0]:
            raise HRankError(f"{p}: {data.shape[0]} images but {labs.shape[0]} labels")
        images.append(data)
        labels.append(labs)
    data = np.concatenate(images)
    labs = np.concatenate(labels)
    if expected is not None and data.shape[0] != expected:
        msg = f"{name}: expected {expected} images, found {data.shape[0]} in {Path(paths[0]).parent}"
        if strict_counts:
            raise HRankError(msg)
        warnings.warn(msg + " (not the full official set)", stacklevel=2)
    classes = [str(i) for i in range(num_classes)]
    if meta is not None and Path(meta).exists():
        m = load_batch_pickle(meta)
        names = m.get(names_key, m.get(names_key.decode()))
        if names is not None and len(names) == num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    imgs = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return ImageSet(imgs, torch.from_numpy(labs), classes, name)


def default_data_dir() -> Path:
    """``$HRANK_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("HRANK_DATA", "data"))


def train_val_split(n: int, val_size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, validation) index arrays, both sorted."""
    if not 0 <= val_size < n:
        raise HRankError(f"validation size must be in [0, {n}), got {val_size}")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[val_size:]), np.sort(perm[:val_size])


def normalize(images_uint8: torch.Tensor, norm: Normalization, dtype=torch.float32) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float, scaled to [0, 1], minus mean, over std (on the tensor's device)."""
    x = images_uint8.to(dtype).div_(255.0)
    mean = torch.tensor(norm.mean, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, dtype=dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean).div_(std)


def draw_augmentation(n: int, generator: torch.Generator, padding: int = 4
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-image crop offsets (y, x in [0, 2*padding]) and flip flags, drawn on the CPU from ``generator``."""
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    return oy, ox, flip


def crop_flip(images: torch.Tensor, oy: torch.Tensor, ox: torch.Tensor, flip: torch.Tensor,
              padding: int = 4) -> torch.Tensor:
    """Crop each image at its offsets from a zero-padded copy and flip where asked, on the images' device."""
    n, c, h, w = images.shape
    dev = images.device
    if padding > 0:
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        rows = (oy.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        images = padded[torch.arange(n, device=dev)[:, None, None, None],
                        torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    return torch.where(flip.to(dev)[:, None, None, None], images.flip(3), images)


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop (zero padding ``padding``) and horizontal flip of a batch, on the batch's device.

    Random numbers come from a CPU generator, so the result is the same on every device for a seed.
    """
    return crop_flip(images, *draw_augmentation(images.shape[0], generator, padding), padding)


class Batches:
    """Iterate ``(images, labels)`` batches from an ImageSet, augmented and normalized on ``device``.

    Deterministic: the order and the augmentation of epoch ``e`` depend only on ``(seed, e)``. With
    ``world_size > 1`` each rank takes an equal, disjoint shard of every epoch's order (DDP); an image's
    crop and flip depend on its position in the global order, not on the rank, so N processes with batch
    B/N see exactly the global batches one process with batch B sees.
    """

    def __init__(self, data: ImageSet, batch_size: int, *, normalization: Normalization | str | dict = "cifar",
                 train: bool = False, shuffle: bool | None = None, drop_last: bool | None = None,
                 device: torch.device | str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 channels_last: bool = False, dtype: torch.dtype = torch.float32) -> None:
        if batch_size < 1:
            raise HRankError(f"batch size must be >= 1, got {batch_size}")
        if len(data) == 0:
            raise HRankError(f"dataset {data.name or ''} is empty".replace("  ", " "))
        self.device = torch.device(device) if device is not None else data.images.device
        self.data = data.to(self.device)
        self.batch_size = batch_size
        self.norm = Normalization.get(normalization)
        self.train = train
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        if self.drop_last and len(data) // world_size < batch_size:
            raise HRankError(f"batch size {batch_size} is larger than the dataset "
                             f"({len(data)} images{' per process' if world_size > 1 else ''})")
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.channels_last = channels_last
        self.dtype = dtype
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration produces."""
        self.epoch = epoch

    def shard(self, rank: int, world_size: int) -> Batches:
        """The same (unshuffled) batches over this process's contiguous slice of the images, so summed
        counts over the processes cover every image once (sharded evaluation)."""
        n = len(self.data)
        lo, hi = n * rank // world_size, n * (rank + 1) // world_size
        if hi <= lo:
            raise HRankError(f"evaluation set of {n} images is smaller than the {world_size} processes")
        part = self.data.subset(torch.arange(lo, hi), self.data.name)
        return Batches(part, min(self.batch_size, hi - lo), normalization=self.norm, train=False,
                       device=self.device, channels_last=self.channels_last, dtype=self.dtype)

    def _positions(self) -> tuple[torch.Tensor, slice]:
        """The epoch's global order (padded so every rank gets as many) and this rank's slice of it."""
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if self.world_size == 1:
            return order, slice(None)
        per = n // self.world_size if self.drop_last else -(-n // self.world_size)
        if per * self.world_size > n:  # pad by repeating, as DistributedSampler does
            order = torch.cat([order, order[: per * self.world_size - n]])
        return order, slice(self.rank, per * self.world_size, self.world_size)

    def _order(self) -> torch.Tensor:
        order, mine = self._positions()
        return order[mine]

    @property
    def num_samples(self) -> int:
        """Images this rank sees per epoch."""
        n = len(self._order())
        return n - n % self.batch_size if self.drop_last else n

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        full, mine = self._positions()
        order = full[mine]
        if self.train:  # drawn for the global order, so every rank count gives an image the same crop/flip
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch + 7_777_777)
            oy, ox, flip = (t[mine] for t in draw_augmentation(len(full), g))
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            imgs = self.data.images[order[sl].to(self.device)]
            if self.train:
                imgs = crop_flip(imgs, oy[sl], ox[sl], flip[sl])
            x = normalize(imgs, self.norm, self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, self.data.labels[order[sl].to(self.device)]
