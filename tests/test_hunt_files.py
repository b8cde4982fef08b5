"""Damaged files and inputs an audit found crashing with a traceback (or read wrongly): each is one HRankError line.

Ranks files (header fields, score arrays), official rank folders, later batches of a ranking iterable, plan JSON
(version, input_size), model-file records and CIFAR batch labels. Every file is built here, small.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from hrank import checkpoint
from hrank.data import load_batch_files
from hrank.errors import HRankError
from hrank.plan import PLAN_FORMAT, Plan
from hrank.ranks import Ranks, compute_ranks


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# --- 1. Ranks.load: damaged header fields and score arrays ---

_HEADER = {"format": "hrank-ranks", "version": 1, "convs": ["a", "b"], "num_images": 8, "spatial": {"a": [4, 4]},
           "points": {"a": {"module": "a", "channels": None}}, "fingerprint": "x", "arch": None, "meta": {}}


def _write_ranks(path, header, scores=None):
    arrays = dict(scores if scores is not None else {"s0": np.arange(4.0), "s1": np.ones(2)})
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("header, scores, what", [
    (["format"], None, "header"),
    ({k: v for k, v in _HEADER.items() if k != "num_images"}, None, "num_images"),
    ({**_HEADER, "num_images": "abc"}, None, "num_images"),
    ({**_HEADER, "num_images": None}, None, "num_images"),
    ({**_HEADER, "version": "2"}, None, "version"),
    ({**_HEADER, "spatial": {"a": 5}}, None, "spatial"),
    ({**_HEADER, "points": {"a": 5}}, None, "rank point of a"),
    ({**_HEADER, "points": [1]}, None, "points"),
    ({**_HEADER, "meta": [1]}, None, "meta"),
    ({**_HEADER, "meta": {"model_convs": [1, 2]}}, None, "model_convs"),
    ({**_HEADER, "convs": "ab"}, None, "convs"),
    ({**_HEADER, "arch": 5}, None, "arch"),
    (_HEADER, {"s0": np.float64(1.0), "s1": np.ones(2)}, "scores of a"),
    (_HEADER, {"s0": np.ones((2, 2)), "s1": np.ones(2)}, "scores of a"),
    (_HEADER, {"s0": np.ones(4), "s1": np.ones(2) + 1j}, "scores of b"),
])
def test_damaged_ranks_header_is_one_line(tmp_path, header, scores, what):
    path = _write_ranks(tmp_path / "r.npz", header, scores)
    with pytest.raises(HRankError) as e:
        Ranks.load(path)
    msg = _one_line(e)
    assert str(path) in msg and what in msg


def test_good_ranks_file_still_loads(tmp_path):
    ranks = Ranks.load(_write_ranks(tmp_path / "r.npz", _HEADER))
    assert ranks.num_images == 8 and ranks.spatial == {"a": (4, 4)} and ranks.points["a"].module == "a"
    assert list(ranks.scores["a"]) == [0.0, 1.0, 2.0, 3.0]
    weight = Ranks({"a": np.ones(3)}, 0, fingerprint="f")  # weight criteria record 0 images
    weight.save(tmp_path / "w.npz")
    assert Ranks.load(tmp_path / "w.npz").num_images == 0


# --- 2. Ranks.from_official: empty, text and non-finite .npy files ---

@pytest.mark.parametrize("content, what", [(None, "empty or truncated"), (np.array(["x"] * 64), "text"),
                                           (np.full(64, np.nan), "not finite")])
def test_damaged_official_rank_file_is_one_line(tmp_path, content, what):
    path = tmp_path / "rank_conv1.npy"
    if content is None:
        path.write_bytes(b"")
    else:
        np.save(path, content)
    with pytest.raises(HRankError) as e:
        Ranks.from_official(tmp_path, "vgg_16_bn")
    msg = _one_line(e)
    assert "rank_conv1.npy" in msg and what in msg


# --- 3. compute_ranks: every batch must have the first batch's image shape ---

class _TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv(x)).mean((2, 3))


@pytest.mark.parametrize("second", [(4, 3, 2, 2), (4, 1, 8, 8)])
def test_later_batch_with_another_image_shape_is_refused(second):
    torch.manual_seed(0)
    batches = [torch.rand(4, 3, 8, 8), torch.rand(*second)]
    with pytest.raises(HRankError) as e:
        compute_ranks(_TinyNet().eval(), batches, num_images=8, batch_size=4, progress=False, workers=1)
    msg = _one_line(e)
    assert "batch 1" in msg and "x".join(map(str, second[1:])) in msg and "3x8x8" in msg


def test_batches_of_one_shape_still_rank():
    torch.manual_seed(0)
    r = compute_ranks(_TinyNet().eval(), [torch.rand(4, 3, 8, 8), torch.rand(2, 3, 8, 8)], num_images=6,
                      batch_size=4, progress=False, workers=1)
    assert r.num_images == 6 and r.spatial["conv"] == (8, 8)


# --- 4. Plan.from_json / Plan.load: version and input_size ---

_PLAN = {"format": PLAN_FORMAT, "version": 1, "input_size": [3, 8, 8], "coupling": "groups", "groups": []}


@pytest.mark.parametrize("change, what", [
    ({"version": "x"}, "version"), ({"version": None}, "version"),
    ({"input_size": [3, -1, 5]}, "input_size"), ({"input_size": [3, 0, 5]}, "input_size"),
    ({"input_size": [3, 100000, 100000]}, "too large"), ({"input_size": [3, 20000, 20000]}, "too large"),
    ({"input_size": "big"}, "input_size"), ({"input_size": [3, 8.5, 8]}, "input_size"),
    ({"input_size": [3, True, 8]}, "input_size"), ({"input_size": []}, "input_size"),
])
def test_damaged_plan_is_one_line(tmp_path, change, what):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({**_PLAN, **change}))
    with pytest.raises(HRankError) as e:
        Plan.load(path)
    msg = _one_line(e)
    assert str(path) in msg and what in msg
    with pytest.raises(HRankError):
        Plan.from_json({**_PLAN, **change})


def test_good_plan_still_loads():
    assert Plan.from_json(_PLAN).input_size == [3, 8, 8]


# --- 5. checkpoint.read_record / build_from_record: damaged records ---

class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)


def _saved(tmp_path, name, change):
    path = tmp_path / "good.pt"
    checkpoint.save(_Net(), path, normalization="cifar")
    obj = torch.load(path, weights_only=True)
    record = json.loads(obj["hrank_record"])
    new = change if not isinstance(change, dict) else {**record, **change}
    torch.save({**obj, "hrank_record": json.dumps(new)}, tmp_path / name)
    return tmp_path / name


@pytest.mark.parametrize("change, what", [
    ([], "list"), ("x", "'x'"), ({"version": "x"}, "version"), ({"version": None}, "version"),
    ({"normalization": {"mean": [0.5, 0.5, 0.5]}}, "normalization"),
    ({"normalization": {"mean": [0.5], "std": [0.0]}}, "normalization"),
    ({"normalization": 5}, "normalization"),
    ({"state_metadata": {"": 5}}, "state_metadata"), ({"state_metadata": [1]}, "state_metadata"),
    ({"plan": "garbage"}, "plan"), ({"mode": "weird"}, "mode"), ({"mode": 3}, "mode"),
])
def test_damaged_model_record_is_one_line(tmp_path, change, what):
    path = _saved(tmp_path, "bad.pt", change)
    with pytest.raises(HRankError) as e:
        checkpoint.load(path, builder=_Net)
    msg = _one_line(e)
    assert str(path) in msg and what in msg
    record = json.loads(torch.load(path, weights_only=True)["hrank_record"])
    if isinstance(record, dict):  # a training checkpoint's record goes to build_from_record directly
        with pytest.raises(HRankError, match=what.strip("'")):
            checkpoint.build_from_record(record, _Net)


def test_good_model_record_still_loads(tmp_path):
    model, meta = checkpoint.load(_saved(tmp_path, "ok.pt", {}), builder=_Net)
    assert isinstance(model, _Net) and meta["normalization"]["std"]
    with pytest.raises(HRankError, match="newer"):
        checkpoint.load(_saved(tmp_path, "new.pt", {"version": checkpoint.VERSION + 1}), builder=_Net)


# --- 6. CIFAR batch labels: integers (or integer-valued) in range ---

def _batch(tmp_path, labels):
    path = tmp_path / "data_batch_1"
    data = np.zeros((len(labels), 3072), dtype=np.uint8)
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)
    return path


@pytest.mark.parametrize("labels, what", [(["a", "b"], "text"), ([0.5, 1.0], "0.5"), ([True, False], "true"),
                                          ([float("nan"), 1.0], "nan"), ([[0], [1]], "flat")])
def test_labels_that_are_not_integers_are_one_line(tmp_path, labels, what):
    path = _batch(tmp_path, labels)
    with pytest.raises(HRankError) as e:
        load_batch_files([path], 10)
    msg = _one_line(e)
    assert str(path) in msg and "labels" in msg and what in msg


def test_integer_valued_labels_still_load(tmp_path):
    assert load_batch_files([_batch(tmp_path, [1.0, 9.0])], 10).labels.tolist() == [1, 9]
    assert load_batch_files([_batch(tmp_path, np.array([3, 4], dtype=np.uint8))], 10).labels.tolist() == [3, 4]
    with pytest.raises(HRankError, match="outside 0..9"):
        load_batch_files([_batch(tmp_path, [10.0, 1.0])], 10)
