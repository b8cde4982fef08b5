"""Image folders (``dataset: imagefolder``, ImageNet layout): listing, deterministic DDP-exact batches, shards,
errors, the registry entry and ranks. Folders are built at test time (synthetic PNGs, and real CIFAR-10 images
when /work/shared/data/cifar10 or $HRANK_CIFAR10 holds them)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

torchvision = pytest.importorskip("torchvision")

from hrank import datasets  # noqa: E402
from hrank.errors import HRankError  # noqa: E402
from hrank.imagefolder import FolderBatches, FolderSplit, check_root, load_root  # noqa: E402

# torchvision 0.29 deprecates its image codecs (for torchcodec); pytest resets hrank's filter for every test
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")
CPU = torch.device("cpu")
CIFAR_CANDIDATES = [os.environ.get("HRANK_CIFAR10", ""), "/work/shared/data/cifar10"]


def _cifar_dir() -> Path | None:
    for cand in CIFAR_CANDIDATES:
        if cand and (Path(cand) / "cifar-10-batches-py" / "data_batch_1").exists():
            return Path(cand) / "cifar-10-batches-py"
    return None


def make_image_folder(root: str | os.PathLike, n_per_class: int, classes: list[str] | int, size: int = 40,
                      real_cifar_dir: str | os.PathLike | None = None) -> Path:
    """Write ``ROOT/train/<class>/*.png`` (``n_per_class`` each) and ``ROOT/val/<class>/*.png``
    (``max(1, n_per_class // 2)`` each); returns ROOT.

    Synthetic images (seeded noise plus a class-dependent colour, widths ``size``, ``size + 8``, ``size + 16``
    in turn so that crops see several shapes), or with ``real_cifar_dir`` (a folder holding
    ``cifar-10-batches-py`` or that folder itself) the first CIFAR-10 training / test images of each class
    (``classes``: CIFAR class names, or a count of the first classes), resized to ``size`` when it is not 32
    (PNG is lossless, so at 32 the files decode to CIFAR's exact pixels).
    """
    from torchvision.io import write_png

    root = Path(root)
    n_val = max(1, n_per_class // 2)
    if real_cifar_dir is not None:
        from hrank.data import load_batch_pickle

        src = Path(real_cifar_dir)
        src = src / "cifar-10-batches-py" if (src / "cifar-10-batches-py").is_dir() else src
        names = [n.decode() for n in load_batch_pickle(src / "batches.meta")[b"label_names"]]
        wanted = names[:classes] if isinstance(classes, int) else list(classes)
        for split, file, count in (("train", "data_batch_1", n_per_class), ("val", "test_batch", n_val)):
            batch = load_batch_pickle(src / file)
            data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
            labels = np.asarray(batch[b"labels"])
            for cls in wanted:
                folder = root / split / cls
                folder.mkdir(parents=True, exist_ok=True)
                for i in np.flatnonzero(labels == names.index(cls))[:count]:
                    img = torch.from_numpy(data[i])
                    if size != 32:
                        img = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear",
                                                              antialias=True)[0].round().clamp(0, 255).byte()
                    write_png(img, str(folder / f"{split}_{i:05d}.png"))
        return root
    names = [f"class_{i:02d}" for i in range(classes)] if isinstance(classes, int) else list(classes)
    g = torch.Generator().manual_seed(1234)
    for split, count in (("train", n_per_class), ("val", n_val)):
        for c, cls in enumerate(names):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                w = size + 8 * (k % 3)
                img = torch.randint(0, 256, (3, size, w), generator=g, dtype=torch.uint8)
                img[c % 3] = (img[c % 3] // 2 + 100).to(torch.uint8)
                write_png(img, str(folder / f"img_{k:04d}.png"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes x 12 training (6 validation) synthetic PNGs of 40 x 40..56 px."""
    return make_image_folder(tmp_path_factory.mktemp("imgs"), 12, ["cat", "ant", "bee"], size=40)


@pytest.fixture(scope="module")
def cifar_image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real CIFAR-10 images as PNG folders (10 classes x 20 train, x 10 val, 32 px); skipped without the data."""
    src = _cifar_dir()
    if src is None:
        pytest.skip("no CIFAR-10 copy (set HRANK_CIFAR10)")
    return make_image_folder(tmp_path_factory.mktemp("cifar_imgs"), 20, 10, size=32, real_cifar_dir=src)


def _split(root: Path, which: str = "train", **kw) -> FolderSplit:
    kw.setdefault("image_size", 24)
    kw.setdefault("resize_size", 32)
    kw.setdefault("workers", 0)
    return FolderSplit.from_folder(root / which, **kw)


def _all(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in batches]


def test_listing_is_sorted_and_complete(folder: Path) -> None:
    split = _split(folder)
    assert split.classes == ["ant", "bee", "cat"] and split.num_classes == 3 and len(split) == 36
    assert split.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12
    paths = [split.path(i) for i in range(len(split))]
    assert paths == sorted(paths) and len(set(paths)) == 36 and all(Path(p).is_file() for p in paths)
    assert Path(paths[0]).relative_to(folder / "train").parts == ("ant", "img_0000.png")
    sub = split.subset([5, 30, 2], "sub")
    assert (len(sub), sub.name, sub.classes, sub.labels.tolist()) == (3, "sub", split.classes, [0, 2, 0])
    assert sub.path(1) == split.path(30) and sub.image_size == 24 and sub.resize_size == 32
    assert check_root(folder) == ["ant", "bee", "cat"]
    train, val = load_root(folder, image_size=24, resize_size=32, workers=0)
    assert (len(train), len(val), val.classes) == (36, 18, train.classes)


def test_training_batches_are_deterministic_and_leave_the_rng_alone(folder: Path) -> None:
    split = _split(folder)
    a = split.train_batches(8, normalization="imagenet", device=CPU, seed=3)
    assert len(a) == 36 // 8 and a.num_samples == 32 and a.norm.name == "imagenet" and a.data is split
    state = torch.get_rng_state()
    first = _all(a)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched (bit-exact resume)
    assert first[0][0].shape == (8, 3, 24, 24) and first[0][0].dtype == torch.float32
    again = _all(split.train_batches(8, normalization="imagenet", device=CPU, seed=3))
    assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(first, again, strict=True))
    a.set_epoch(1)
    other = _all(a)
    assert not torch.equal(torch.cat([x for x, _ in first]), torch.cat([x for x, _ in other]))
    seed4 = _all(split.train_batches(8, normalization="imagenet", device=CPU, seed=4))
    assert not torch.equal(first[0][0], seed4[0][0])
    # two worker processes decode exactly what the main process does, epoch after epoch (persistent workers)
    w = FolderBatches(split, 8, normalization="imagenet", train=True, device=CPU, seed=3, workers=2)
    assert torch.equal(torch.get_rng_state(), state)
    for epoch, expected in ((0, first), (1, other)):
        w.set_epoch(epoch)
        got = _all(w)
        assert all(torch.equal(x, x2) and torch.equal(y, y2) for (x, y), (x2, y2) in zip(expected, got, strict=True))
    assert torch.equal(torch.get_rng_state(), state)


def test_two_processes_interleave_into_the_one_process_batches(folder: Path) -> None:
    split = _split(folder).subset(np.arange(35), "odd")  # an odd count: the last position is dropped by both
    big = 8
    one = split.train_batches(big, normalization="imagenet", device=CPU, seed=7)
    ranks = [split.train_batches(big // 2, normalization="imagenet", device=CPU, seed=7, rank=r, world_size=2)
             for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 4 and ranks[1].world_size == 2
    for epoch in range(2):
        for b in (one, *ranks):
            b.set_epoch(epoch)
        for (x, y), (x0, y0), (x1, y1) in zip(one, *ranks, strict=True):
            assert torch.equal(torch.stack([x0, x1], 1).flatten(0, 1), x)
            assert torch.equal(torch.stack([y0, y1], 1).flatten(0, 1), y)


def test_eval_batches_and_shards_cover_every_image_once(folder: Path) -> None:
    split = _split(folder, "val")
    ev = split.eval_batches(5, normalization="imagenet", device=CPU, channels_last=True)
    got = _all(ev)
    assert len(ev) == len(got) == 4 and [len(y) for _, y in got] == [5, 5, 5, 3]
    x_all, y_all = torch.cat([x for x, _ in got]), torch.cat([y for _, y in got])
    assert x_all.shape == (18, 3, 24, 24) and got[0][0].is_contiguous(memory_format=torch.channels_last)
    assert y_all.tolist() == split.labels.tolist()
    assert abs(x_all.mean().item()) < 2  # normalized, not uint8
    shards = [_all(ev.shard(r, 3)) for r in range(3)]
    xs = torch.cat([x for s in shards for x, _ in s])
    ys = torch.cat([y for s in shards for _, y in s])
    assert torch.equal(xs, x_all) and torch.equal(ys, y_all)
    assert _all(split.eval_batches(100, normalization="imagenet", device=CPU))[0][0].shape[0] == 18
    with pytest.raises(HRankError, match="smaller than the 40 processes"):
        ev.shard(0, 40)


def _write(path: Path) -> None:
    from torchvision.io import write_png

    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), str(path))


def test_bad_layouts_are_one_line_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def err(root: Path) -> str:
        with pytest.raises(HRankError) as e:
            load_root(root, workers=0)
        msg = str(e.value)
        assert "\n" not in msg
        return msg

    assert "root not found" in err(tmp_path / "nothing")
    _write(tmp_path / "a" / "train" / "x" / "1.png")
    assert "a/val" in err(tmp_path / "a") and "not found" in err(tmp_path / "a")
    (tmp_path / "a" / "val").mkdir()
    assert "holds no class folders" in err(tmp_path / "a")
    _write(tmp_path / "a" / "val" / "y" / "1.png")
    assert err(tmp_path / "a").endswith("differ (only in train: x; only in val: y)")
    _write(tmp_path / "a" / "val" / "x" / "1.png")
    (tmp_path / "a" / "train" / "y").mkdir()
    (tmp_path / "a" / "train" / "y" / "notes.txt").write_text("not an image")
    assert "no images in class folder y" in err(tmp_path / "a")
    _write(tmp_path / "a" / "train" / "y" / "2.png")
    train, _ = load_root(tmp_path / "a", workers=0)
    assert len(train) == 2
    (tmp_path / "a" / "train" / "y" / "3.png").write_bytes(b"not a png")
    train, _ = load_root(tmp_path / "a", image_size=8, resize_size=8, workers=0)
    with pytest.raises(HRankError, match=r"^cannot decode image .*3\.png"):
        _all(train.eval_batches(4, normalization="imagenet", device=CPU))
    train = FolderSplit.from_folder(tmp_path / "a" / "train", image_size=8, resize_size=8, workers=1)
    with pytest.raises(HRankError, match=r"^cannot decode image .*3\.png") as e:  # raised in a worker
        _all(train.eval_batches(4, normalization="imagenet", device=CPU))
    assert "\n" not in str(e.value)
    with pytest.raises(HRankError, match="larger than the dataset"):
        train.train_batches(4, normalization="imagenet", device=CPU)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # as if it were not installed
    with pytest.raises(HRankError, match=r"^image folders need torchvision: pip install 'hrank\[vision\]'$"):
        datasets.check("imagefolder", datasets.DataOptions(root=tmp_path / "a"))


def test_registry_load_cuts_train_val_test(folder: Path) -> None:
    spec = datasets.get("imagefolder")
    assert spec.normalization == "imagenet" and spec.default_val_size(1_281_167) == 10000
    opts = datasets.DataOptions(root=folder, image_size=24, resize_size=32, workers=0, val_size=6, test_subset=10)
    splits = datasets.load("imagefolder", opts)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 6, 10)
    assert splits.input_size == (3, 24, 24) and splits.num_classes == 3 and splits.normalization == "imagenet"
    assert isinstance(splits.val, FolderSplit) and splits.val.image_size == 24
    tr = {splits.train.path(i) for i in range(30)}
    va = {splits.val.path(i) for i in range(6)}
    assert not tr & va and len(tr | va) == 36
    x, y = next(iter(splits.val.eval_batches(4, normalization="imagenet", device=CPU)))
    assert x.shape == (4, 3, 24, 24) and y.dtype == torch.int64
    default = datasets.load("imagefolder", datasets.DataOptions(root=folder, workers=0))
    assert default.val is not None and len(default.val) == 36 // 20 and default.input_size == (3, 224, 224)


def test_rank_input_feeds_compute_ranks(folder: Path) -> None:
    from hrank.ranks import compute_ranks

    split = _split(folder)
    data = split.rank_input(augment=True, seed=5, normalization="imagenet")
    assert len(data) == 36
    x0, y0 = data[0]
    assert x0.shape == (3, 24, 24) and x0.dtype == torch.float32
    assert torch.equal(data[0][0], x0)  # deterministic per index
    again = split.rank_input(augment=True, seed=5)
    assert torch.equal(again[3][0], data[3][0])
    labels = [data[i][1] for i in range(12)]
    assert len(set(labels)) > 1  # a seeded random sample, not the first class's files
    assert [split.rank_input(seed=6)[i][1] for i in range(12)] != labels
    plain = split.rank_input(augment=False, seed=5)
    assert plain[0][1] == y0 and plain[0][0].shape == (3, 24, 24)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 6, 3), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 3))
    ranks = compute_ranks(model, data, num_images=8, batch_size=4, progress=False)
    again = compute_ranks(model, split.rank_input(augment=True, seed=5), num_images=8, batch_size=4, progress=False)
    assert set(ranks.scores) == {"0", "3"} and ranks.scores["0"].shape == (4,) and ranks.num_images == 8
    assert all(np.array_equal(ranks.scores[k], again.scores[k]) for k in ranks.scores)


def test_real_cifar_images_round_trip(cifar_image_folder: Path) -> None:
    from hrank.data import load_batch_pickle

    train, val = load_root(cifar_image_folder, image_size=32, resize_size=32, workers=0)
    assert (len(train), len(val), train.num_classes) == (200, 100, 10)
    assert train.classes == sorted(train.classes) and "airplane" in train.classes
    # PNG is lossless and eval at 32 px is the identity: the images are CIFAR's pixels, labelled by folder
    batch = load_batch_pickle(_cifar_dir() / "test_batch")
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    names = [n.decode() for n in load_batch_pickle(_cifar_dir() / "batches.meta")[b"label_names"]]
    ev = val.eval_batches(50, normalization={"mean": [0, 0, 0], "std": [1 / 255] * 3}, device=CPU)
    x, y = next(iter(ev))
    for k in (0, 17, 49):
        i = int(Path(val.path(k)).stem.split("_")[1])
        assert batch[b"labels"][i] == names.index(val.classes[int(y[k])])
        assert torch.equal(x[k].round().byte(), torch.from_numpy(data[i]))
    xs, ys = next(iter(train.train_batches(32, normalization="imagenet", device=CPU, seed=0)))
    assert xs.shape == (32, 3, 32, 32) and len(set(ys.tolist())) > 3


def test_every_listed_format_decodes_to_the_same_uint8_pixels(tmp_path: Path) -> None:
    """torchvision's IMG_EXTENSIONS lists BMP, TIFF, PPM and PGM, which its decoder refuses: they go through PIL
    and give the pixels a PNG of the same image gives; 16-bit images keep their high byte (a uint16 tensor
    divided by 255 entered the network up to 257x too bright)."""
    from PIL import Image

    from hrank.imagefolder import _decode

    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)
    want = torch.from_numpy(rgb).permute(2, 0, 1)
    for ext in ("png", "bmp", "tif", "ppm", "webp"):
        path = tmp_path / f"x.{ext}"
        Image.fromarray(rgb).save(path, **({"lossless": True} if ext == "webp" else {}))
        got = _decode(str(path))
        assert got.dtype == torch.uint8 and torch.equal(got, want), ext
    gray = rgb[..., 0]
    Image.fromarray(gray).save(tmp_path / "g.pgm")
    assert torch.equal(_decode(str(tmp_path / "g.pgm")), torch.from_numpy(gray)[None].expand(3, -1, -1))
    deep = rng.integers(0, 65536, (9, 11), dtype=np.uint16)
    for ext in ("png", "tif"):  # torchvision decodes the PNG as uint16, PIL reads the TIFF as mode I;16
        Image.fromarray(deep).save(tmp_path / f"d.{ext}")
        got = _decode(str(tmp_path / f"d.{ext}"))
        assert got.dtype == torch.uint8, ext
        assert torch.equal(got, torch.from_numpy((deep >> 8).astype(np.uint8))[None].expand(3, -1, -1)), ext


def test_unreadable_files_name_the_cause_in_one_line(tmp_path: Path) -> None:
    from hrank.imagefolder import _Images

    _write(tmp_path / "train" / "a" / "ok.png")
    for name, content, cause in (("empty.jpg", b"", "Expected a non empty file"),
                                 ("text.jpg", b"hello", "cannot identify image file"),  # PIL's word: not an image
                                 ("bad.bmp", b"BM" + b"\0" * 10, "")):
        (tmp_path / "train" / "a" / name).write_bytes(content)
        split = FolderSplit.from_folder(tmp_path / "train", workers=0)
        index = [os.fsdecode(f) for f in split.files].index(os.path.join("a", name))
        with pytest.raises(HRankError) as e:
            _Images(split).load(index)
        msg = str(e.value)
        assert msg.startswith(f"cannot decode image {split.path(index)}: ") and "\n" not in msg
        assert cause in msg and ".cpp:" not in msg  # torchvision's C++ source location is not the user's business
        (tmp_path / "train" / "a" / name).unlink()


def test_hidden_folders_are_not_classes(tmp_path: Path) -> None:
    for split in ("train", "val"):
        for cls in ("b", "a"):
            _write(tmp_path / split / cls / "1.png")
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # Jupyter leaves these; torchvision made it a class
    assert check_root(tmp_path) == ["a", "b"]
    train, val = load_root(tmp_path, workers=0)
    assert train.classes == val.classes == ["a", "b"] and len(train) == 2
