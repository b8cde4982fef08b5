"""Mutation-killing tests for hrank.checkpoint (bench/mutation.py, docs/mutation.md): the record's fields and
defaults, the version and format checks, the metadata filter, and that a loaded model is ready to evaluate."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from hrank.checkpoint import (
    FORMAT,
    VERSION,
    build_from_record,
    load,
    model_record,
    read_record,
    save,
    state_metadata,
)
from hrank.errors import HRankError
from hrank.plan import make_plan
from hrank.prune import apply_plan

X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        y = self.b(torch.relu(self.bn(self.a(x))))
        return self.fc(self.drop(y.mean((2, 3))))


def _pruned(mode: str = "physical") -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    scores = {"a": np.arange(8, dtype=float)[::-1].copy(), "b": np.arange(6, dtype=float)}
    return apply_plan(model, make_plan(model, scores, {"a": 0.5}, example_input=X[:1]), mode=mode,
                      example_input=X[:1])


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_record_fields(mode):
    model = _pruned(mode)
    record = model_record(model, extra={"k": 1})
    assert record["format"] == FORMAT and record["version"] == VERSION
    assert record["mode"] == mode and record["arch"] is None and record["num_classes"] == 4
    assert record["normalization"] is None and record["extra"] == {"k": 1}
    assert record["plan"] == model.hrank_plan.to_json() and "state_dict" not in record
    assert record["state_metadata"] == state_metadata(model)
    assert model_record(model, arch="x:y", num_classes=9)["num_classes"] == 9
    assert model_record(model, arch="x:y")["arch"] == "x:y"
    assert model_record(model, normalization="imagenet")["normalization"]["name"] == "imagenet"
    with_weights = model_record(model, weights=True)
    sd = model.state_dict()
    assert set(with_weights["state_dict"]) == set(sd)
    assert all(torch.equal(with_weights["state_dict"][k], sd[k]) for k in sd)
    assert with_weights["state_dict"]["a.weight"].data_ptr() != sd["a.weight"].data_ptr()  # a copy


def test_record_defaults_without_a_plan_or_mode():
    model = Net()
    record = model_record(model)
    assert record["plan"] is None and record["mode"] is None and record["extra"] == {}
    pruned = _pruned()
    del pruned.hrank_mode
    assert model_record(pruned)["mode"] == "physical"  # a plan without a recorded mode is physical
    no_linear = nn.Sequential(nn.Conv2d(3, 4, 1))
    assert model_record(no_linear)["num_classes"] is None
    no_linear.hrank_num_classes = 7
    assert model_record(no_linear)["num_classes"] == 7
    with pytest.raises(HRankError, match="JSON"):
        model_record(model, extra={"bad": object()})


def test_state_metadata_keeps_plain_values_only():
    sd = OrderedDict(w=torch.zeros(1))
    sd._metadata = OrderedDict([("", {"version": 2, "f": 1.5, "s": "x", "n": None, "b": True, "t": torch.ones(1)}),
                                ("sub", {"version": 1}), ("bad", 3)])
    assert state_metadata(sd) == {"": {"version": 2, "f": 1.5, "s": "x", "n": None, "b": True},
                                  "sub": {"version": 1}}
    assert state_metadata({"w": torch.zeros(1)}) == {}
    assert state_metadata(nn.BatchNorm2d(2))[""]["version"] == nn.BatchNorm2d._version


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_save_load_round_trip_in_eval_mode(tmp_path, mode):
    model = _pruned(mode)
    model.train()
    path = save(model, tmp_path / "m.pt", extra={"e": [1, 2]})
    record, state = read_record(path)
    assert record["mode"] == mode and set(state) == set(model.state_dict())
    loaded, meta = load(path, builder=Net)
    assert not loaded.training and not any(m.training for m in loaded.modules())
    assert meta["mode"] == mode and meta["extra"] == {"e": [1, 2]} and meta["arch"] is None
    assert meta["num_classes"] == 4 and meta["plan"].to_json() == model.hrank_plan.to_json()
    assert set(meta) == {"arch", "num_classes", "normalization", "mode", "extra", "hrank_version", "plan"}
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert loaded.a.out_channels == (4 if mode == "physical" else 8)


def test_build_from_record_checks(tmp_path):
    model = _pruned("mask")
    record = model_record(model, weights=True)
    rebuilt = build_from_record(record, Net)
    assert rebuilt.hrank_mode == "mask"
    assert torch.count_nonzero(rebuilt.a.weight[model.hrank_plan.layers["a"]]) > 0
    dropped = [c for c in range(8) if c not in model.hrank_plan.layers["a"]]
    assert torch.count_nonzero(rebuilt.a.weight[dropped]) == 0  # the masks are enforced after loading
    no_mode = {k: v for k, v in record.items() if k not in ("mode", "state_dict")}
    assert build_from_record(no_mode, Net).a.out_channels == 4  # no recorded mode: physical
    assert build_from_record(dict(record, version=VERSION), Net) is not None
    with pytest.raises(HRankError, match="newer"):
        build_from_record(dict(record, version=VERSION + 1), Net)
    with pytest.raises(HRankError, match="not an hrank model record"):
        build_from_record(dict(record, format="other"), Net)
    with pytest.raises(HRankError, match="not an nn.Module"):
        build_from_record(record, lambda: 3)
    plain = build_from_record({"format": FORMAT, "plan": None}, Net)  # no plan, no weights: the builder's model
    assert plain.a.out_channels == 8
    with pytest.raises(HRankError, match="builder="):
        build_from_record({"format": FORMAT})


def test_read_record_refuses_other_files(tmp_path):
    torch.save({"format": FORMAT, "state_dict": {}}, tmp_path / "a.pt")  # no record
    torch.save({"format": "x", "hrank_record": "{}", "state_dict": {}}, tmp_path / "b.pt")
    torch.save([1, 2], tmp_path / "c.pt")
    for name in ("a.pt", "b.pt", "c.pt"):
        with pytest.raises(HRankError, match="not a model saved by hrank.save"):
            read_record(tmp_path / name)
    torch.save({"format": FORMAT, "hrank_record": "{not json", "state_dict": {}}, tmp_path / "d.pt")
    with pytest.raises(HRankError, match="corrupt metadata"):
        read_record(tmp_path / "d.pt")
    torch.save({"format": FORMAT, "hrank_record": json.dumps({"a": 1}), "state_dict": [1]}, tmp_path / "e.pt")
    with pytest.raises(HRankError, match="no state_dict"):
        read_record(tmp_path / "e.pt")
