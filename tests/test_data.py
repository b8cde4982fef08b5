"""CIFAR loading from batch files, validation, splits and device-side augmentation."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from hrank.data import Batches, ImageSet, Normalization, augment, load_batch_files, load_cifar, train_val_split
from hrank.errors import HRankError
from tests.conftest import write_cifar


def test_load_generated_cifar(tiny_cifar):
    with pytest.warns(UserWarning, match="expected 50000 images, found 64"):
        train = load_cifar(tiny_cifar, "cifar10", "train", download=False)
    with pytest.warns(UserWarning, match="expected 10000 images, found 32"):
        test = load_cifar(tiny_cifar, "cifar10", "test", download=False)
    assert train.images.shape == (64, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.labels.shape == (32,) and test.labels.dtype == torch.int64
    assert train.classes[3] == "class3"
    # pixel layout: 1024 R, then G, then B, each row-major
    with open(tiny_cifar / "cifar-10-batches-py" / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(train.images[0, 1].flatten(), torch.from_numpy(raw[b"data"][0, 1024:2048]))
    with pytest.raises(HRankError, match="expected 50000"):
        load_cifar(tiny_cifar, "cifar10", "train", download=False, strict_counts=True)


def test_missing_data_names_the_folder(tmp_path):
    with pytest.raises(HRankError, match=str(tmp_path / "empty")):
        load_cifar(tmp_path / "empty", "cifar10", "train", download=False)


def test_bad_batch_files_are_rejected(tmp_path):
    root = write_cifar(tmp_path / "d")
    bad = root / "cifar-10-batches-py" / "test_batch"
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, f)
    with pytest.raises(HRankError, match=r"shape \(N, 3072\)"):
        load_cifar(root, split="test", download=False)
    with open(bad, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 12]}, f)
    with pytest.raises(HRankError, match="labels outside"):
        load_cifar(root, split="test", download=False)
    bad.write_bytes(b"garbage")
    with pytest.raises(HRankError, match="cannot read CIFAR batch"):
        load_cifar(root, split="test", download=False)


def test_cifar100_layout(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 20), ("test", 10)):
        with open(d / split, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"fine_labels": [int(x) for x in rng.integers(0, 100, n)]}, f)
    with pytest.warns(UserWarning):
        ds = load_cifar(tmp_path, "cifar100", "train", download=False)
    assert len(ds) == 20 and ds.num_classes == 100


def test_split_is_seeded_disjoint_and_complete():
    a_train, a_val = train_val_split(100, 20, seed=3)
    b_train, b_val = train_val_split(100, 20, seed=3)
    assert np.array_equal(a_val, b_val) and len(a_val) == 20
    assert sorted(np.concatenate([a_train, a_val]).tolist()) == list(range(100))
    assert not np.array_equal(train_val_split(100, 20, seed=4)[1], a_val)
    with pytest.raises(HRankError):
        train_val_split(10, 10)


def _set(n=10):
    g = torch.Generator().manual_seed(0)
    return ImageSet(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(n) % 10,
                    [str(i) for i in range(10)])


def test_augment_is_a_padded_crop_or_flip():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    out = augment(imgs, torch.Generator().manual_seed(1), padding=2)
    padded = torch.nn.functional.pad(imgs, (2, 2, 2, 2))
    for i in range(2):
        candidates = [padded[i, :, y:y + 8, x:x + 8] for y in range(5) for x in range(5)]
        candidates += [c.flip(2) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)


def test_batches_deterministic_normalized_and_sharded():
    data = _set(10)
    norm = Normalization.get("cifar")
    plain = list(Batches(data, 4, normalization=norm))
    assert [len(y) for _, y in plain] == [4, 4, 2]
    x0 = (data.images[0].float() / 255 - torch.tensor(norm.mean).view(3, 1, 1)) / torch.tensor(norm.std).view(3, 1, 1)
    assert torch.allclose(plain[0][0][0], x0)
    a = Batches(data, 4, train=True, seed=5)
    b = Batches(data, 4, train=True, seed=5)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    a.set_epoch(1)
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])
    shards = [Batches(data, 2, train=True, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([y for _, y in s]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 4  # drop_last in training: 5 per rank -> 2 batches of 2
    assert set(seen[0].tolist()).isdisjoint(seen[1].tolist())


def test_batch_larger_than_dataset_is_an_error():
    with pytest.raises(HRankError, match="larger than the dataset"):
        Batches(_set(10), 64, train=True)
    with pytest.raises(HRankError, match="batch size must be"):
        Batches(_set(10), 0)


def test_normalization_presets_and_roundtrip():
    assert Normalization.get("imagenet").mean == (0.485, 0.456, 0.406)
    n = Normalization.get("cifar")
    assert Normalization.get(n.to_json()) == n
    with pytest.raises(HRankError, match="unknown normalization"):
        Normalization.get("foo")


@pytest.mark.integration
def test_real_cifar10_copy(real_cifar10):
    train = load_cifar(real_cifar10, "cifar10", "train", download=False, strict_counts=True)
    test = load_cifar(real_cifar10, "cifar10", "test", download=False, strict_counts=True)
    assert len(train) == 50000 and len(test) == 10000
    assert torch.bincount(train.labels).tolist() == [5000] * 10
    assert train.classes[0] == "airplane"
    mean = train.images[:5000].float().mean(dim=(0, 2, 3)) / 255
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.01)
    lossless = load_batch_files([real_cifar10 / "lossless_subset" / "test_batch_first1000"], 10)
    assert len(lossless) == 1000 and torch.equal(lossless.labels, test.labels[:1000])
