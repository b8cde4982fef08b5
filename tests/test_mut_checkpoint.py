"""Mutation-killing tests for hrank.checkpoint (bench/mutation.py, docs/mutation.md): the record's fields and
defaults, the version and format checks, the metadata filter, and that a loaded model is ready to evaluate."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import hrank
from hrank import models
from hrank.checkpoint import (
    FORMAT,
    VERSION,
    build_from_record,
    load,
    load_state,
    model_record,
    read_record,
    save,
    state_metadata,
)
from hrank.errors import HRankError
from hrank.models import external
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


# --- survivors of the first mutation run (docs/mutation.md) ---

TINY = '''
import torch
from torch import nn


class Tiny(nn.Module):
    """A conv classifier (no Linear: num_classes is not readable from the layers)."""

    def __init__(self, num_classes):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, num_classes, 1)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.a(x)))).mean((2, 3))


def make(num_classes=3):
    return Tiny(num_classes)
'''


def _tiny_ref(tmp_path) -> str:
    (tmp_path / "tiny.py").write_text(TINY, encoding="utf-8")
    return f"{tmp_path / 'tiny.py'}:make"


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    a.eval()
    b.eval()
    with torch.no_grad():
        return torch.equal(a(X), b(X))


def test_registry_reference_rebuilds_with_the_recorded_num_classes(tmp_path):
    ref = _tiny_ref(tmp_path)
    model = models.create(ref, num_classes=7)  # the factory's default is 3
    path = save(model, tmp_path / "m.pt")
    loaded, meta = load(path)  # no builder: rebuilt from the recorded reference
    assert meta["arch"] == ref and meta["num_classes"] == 7
    assert loaded.head.out_channels == 7 and loaded.hrank_num_classes == 7
    assert _same_outputs(loaded, model)


def test_explicit_plan_arch_and_num_classes_are_what_save_records(tmp_path):
    """A model built outside hrank.models.create whose plan attribute is gone: everything comes from save's
    arguments, and the file still rebuilds the pruned model exactly."""
    ref = _tiny_ref(tmp_path)
    model = external.build(ref, 7)
    assert not hasattr(model, "hrank_arch") and not hasattr(model, "hrank_num_classes")
    scores = {"a": np.arange(8, dtype=float)}  # keeps filters 4..7
    apply_plan(model.eval(), make_plan(model, scores, {"a": 0.5}, example_input=X[:1]), example_input=X[:1])
    plan = model.hrank_plan
    del model.hrank_plan
    path = save(model, tmp_path / "m.pt", plan=plan, arch=ref, num_classes=7)
    record, _ = read_record(path)
    assert record["arch"] == ref and record["num_classes"] == 7
    assert record["plan"] == plan.to_json() and record["plan"]["layers"]["a"] == [4, 5, 6, 7]
    assert record["mode"] == "physical"
    with pytest.raises(HRankError, match="does not run code a file names"):
        load(path)  # the file names code nobody in this process asked for
    models.trust(ref)  # what --model REF or a run config's model does
    loaded, meta = load(path)
    assert loaded.a.out_channels == 4 and loaded.head.out_channels == 7
    assert meta["plan"].to_json() == plan.to_json()
    assert _same_outputs(loaded, model)


def test_model_record_prefers_the_plan_it_is_given():
    model = Net()  # carries no plan
    plan = make_plan(model, {"a": np.arange(8, dtype=float)}, {"a": 0.25}, example_input=X[:1])
    record = model_record(model, plan=plan)
    assert record["plan"] == plan.to_json() and record["plan"]["layers"]["a"] == [2, 3, 4, 5, 6, 7]
    assert record["mode"] == "physical"
    pruned = _pruned()  # carries another plan: the argument still wins
    assert model_record(pruned, plan=plan)["plan"]["layers"]["a"] == [2, 3, 4, 5, 6, 7]


def test_record_and_load_report_the_hrank_version(tmp_path):
    model = _pruned()
    assert model_record(model)["hrank_version"] == hrank.__version__
    _, meta = load(save(model, tmp_path / "m.pt"), builder=Net)
    assert meta["hrank_version"] == hrank.__version__


def test_builder_must_make_the_recorded_arch():
    record = model_record(_pruned(), arch="nets.zoo:small", weights=True)
    want = _pruned()
    plain = build_from_record(record, Net)  # a builder whose model names no arch: trusted
    assert plain.a.out_channels == 4 and _same_outputs(plain, want)

    def tagged(arch):
        def build():
            net = Net()
            net.hrank_arch = arch
            return net
        return build

    same = build_from_record(record, tagged("nets.zoo:small"))
    assert same.a.out_channels == 4 and _same_outputs(same, want)
    with pytest.raises(HRankError) as err:
        build_from_record(record, tagged("nets.zoo:large"))
    assert str(err.value) == "the file holds nets.zoo:small, the builder made nets.zoo:large"
    unnamed = dict(record, arch=None)  # a record without arch: any builder goes
    assert build_from_record(unnamed, tagged("nets.zoo:large")).a.out_channels == 4


def test_unresolvable_reference_is_a_one_line_error(tmp_path):
    missing = tmp_path / "gone.py"
    ref = f"{missing}:make"
    record = {"format": FORMAT, "version": VERSION, "arch": ref, "num_classes": 3}
    models.trust(ref)  # named by the user: a file alone never makes hrank import code
    with pytest.raises(HRankError) as err:
        build_from_record(record)
    assert str(err.value) == (f"cannot rebuild the saved model {ref!r}: no file {missing} "
                              "(or pass builder=, a callable returning the unpruned model)")


class Scaled(nn.Module):
    """Version 2 added the buffer ``scale``; a state that says it is version 1 cannot hold one, and the loader
    reports it as unexpected rather than loading it."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.register_buffer("scale", torch.ones(4))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if local_metadata.get("version", 2) < 2 and prefix + "scale" in state_dict:
            unexpected_keys.append(prefix + "scale")  # not loaded: version 1 has no scale
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + "scale"}
            missing_keys = []  # the default scale stays: not missing from a version-1 state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def test_load_state_is_strict_about_what_the_loaders_report():
    source = Scaled()
    with torch.no_grad():
        source.scale.fill_(3.0)
    state = source.state_dict()
    meta = state_metadata(source)
    assert meta[""]["version"] == 2
    target = Scaled()
    load_state(target, state, meta)
    assert torch.equal(target.scale, torch.full((4,), 3.0))
    stale = Scaled()
    with pytest.raises(RuntimeError, match='Unexpected key.*"scale"'):
        load_state(stale, state, {**meta, "": {"version": 1}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_record_weights_are_copied_to_the_cpu():
    model = _pruned().cuda()
    record = model_record(model, weights=True)
    assert all(v.device.type == "cpu" for v in record["state_dict"].values())
