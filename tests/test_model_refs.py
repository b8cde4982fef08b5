"""Model references beyond the registry: ``package.module:factory`` (and ``file.py:factory``), ``torchvision:NAME``
and ``timm:NAME`` create, prune, save and load like registry models; every failure is one line naming the reference.
The torchvision/timm tests run where those packages are installed (``pip install 'hrank[vision]' timm``)."""

from __future__ import annotations

import sys
import textwrap
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hrank
from hrank import models
from hrank.checkpoint import build_from_record, load_weights, model_record
from hrank.errors import HRankError
from hrank.layers import is_conv
from hrank.plan import make_plan
from hrank.prune import apply_plan
from hrank.spec import Spec

NETS = textwrap.dedent('''
    import torch
    from torch import nn


    class Net(nn.Module):
        def __init__(self, num_classes=10):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
            self.bn2 = nn.BatchNorm2d(16)
            self.conv3 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
            self.bn3 = nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = x + torch.relu(self.bn2(self.conv2(x)))
            x = torch.relu(self.bn3(self.conv3(x)))
            return self.fc(x.mean((2, 3)))


    def make_net(num_classes: int = 10):
        """A small residual CNN for CIFAR-sized images."""
        return Net(num_classes)


    make_net.hrank_defaults = {"input_size": (3, 32, 32), "dataset": "cifar", "normalization": "cifar"}


    def fixed_net():
        return Net(7)


    def kwargs_net(**kwargs):
        return Net(**kwargs)


    def broken(num_classes=10):
        raise ValueError("boom\\nsecond line")


    def not_a_model():
        return 42


    NOT_CALLABLE = 3


    class Zoo:
        @staticmethod
        def small(num_classes=10):
            return Net(num_classes)
''')

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def netmod(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A freshly named module holding the test factories, importable through sys.path."""
    name = f"hrank_test_nets_{uuid.uuid4().hex[:10]}"
    (tmp_path / f"{name}.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def _scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}


def _error(ref: str, fn=models.create, **kw) -> str:
    with pytest.raises(HRankError) as e:
        fn(ref, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# -- module:factory ---------------------------------------------------------------------------------------------

def test_factory_create_and_spec(netmod):
    ref = f"{netmod}:make_net"
    model = models.create(ref, num_classes=5)
    assert model.fc.out_features == 5 and model.hrank_arch == ref and model.hrank_num_classes == 5
    assert models.create(ref).fc.out_features == 10  # the factory's own default
    assert not models.is_registry(ref) and models.is_registry("resnet_56") and ref not in models.names()
    spec = models.get_spec(ref)
    assert (spec.name, spec.input_size, spec.num_classes, spec.normalization, spec.dataset) == (
        ref, (3, 32, 32), 10, "cifar", "cifar")
    assert spec.description == "A small residual CNN for CIFAR-sized images."
    assert models.prunable_convs(model) == ["conv1", "conv2", "conv3"]
    assert models.rate_entries(ref) == [("conv1",), ("conv2",), ("conv3",)]
    assert models.rank_points(model) == {}
    assert spec.builder(num_classes=3).fc.out_features == 3


def test_factory_defaults_and_num_classes(netmod):
    spec = models.get_spec(f"{netmod}:fixed_net")  # no num_classes parameter, no hrank_defaults
    assert (spec.input_size, spec.num_classes, spec.normalization, spec.dataset) == (
        (3, 224, 224), 1000, "imagenet", "imagenet")
    assert models.create(f"{netmod}:fixed_net", num_classes=10).fc.out_features == 7  # not passed: not accepted
    assert models.create(f"{netmod}:kwargs_net", num_classes=4).fc.out_features == 4  # **kwargs accept it
    assert models.create(f"{netmod}:Zoo.small", num_classes=3).fc.out_features == 3  # dotted attribute
    assert models.create(f"{netmod}:Net", num_classes=2).fc.out_features == 2  # a class is a factory too


def test_factory_from_file(tmp_path: Path):
    path = tmp_path / "my_nets.py"
    path.write_text(NETS)
    ref = f"{path}:make_net"
    model = models.create(ref, num_classes=6)
    assert model.fc.out_features == 6 and model.hrank_arch == ref
    assert models.get_spec(ref).input_size == (3, 32, 32)
    assert "no file" in _error(f"{tmp_path / 'missing.py'}:make_net")


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_factory_prune_save_load_round_trip(netmod, tmp_path: Path, mode):
    ref = f"{netmod}:make_net"
    torch.manual_seed(0)
    model = models.create(ref, num_classes=5)
    plan = make_plan(model, _scores(model), {"*": 0.5})  # example input from the spec: 3x32x32
    assert plan.arch == ref
    pruned = apply_plan(model, plan, mode=mode).eval()
    if mode == "physical":
        assert pruned.conv3.out_channels == 16 and pruned.conv1.out_channels == pruned.conv2.out_channels == 8
    hrank.save(pruned, tmp_path / "m.pt", normalization="cifar")
    loaded, meta = hrank.load(tmp_path / "m.pt")  # no builder: rebuilt from the recorded reference
    assert meta["arch"] == ref and meta["num_classes"] == 5 and meta["mode"] == mode
    assert loaded.hrank_arch == ref
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    record = model_record(pruned, weights=True)  # a training checkpoint's record rebuilds it too
    rebuilt = build_from_record(record).eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(X), pruned(X))


def test_a_file_never_chooses_code_to_run(netmod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    """A model file records the reference that built it; a ``module:factory`` one is imported only when the user
    names it (``--model``), so a crafted file cannot make hrank import and call something of its choosing."""
    from hrank.checkpoint import FORMAT, VERSION
    from hrank.cli import main

    ref = f"{netmod}:make_net"
    hrank.save(models.create(ref, num_classes=5), tmp_path / "m.pt", normalization="cifar")
    monkeypatch.setattr(models, "_NAMED_BY_USER", set())  # a fresh process: nothing named yet
    assert main(["info", "--model", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert "does not run code a file names" in err and f"--model {ref}" in err and err.count("\n") == 1
    (tmp_path / "evil.py").write_text("open(__file__ + '.ran', 'w').close()\ndef f():\n    return 1\n")
    for arch in ("sys:exit", "os:abort", f"{tmp_path / 'evil.py'}:f"):
        record = {"format": FORMAT, "version": VERSION, "arch": arch, "num_classes": 10}
        with pytest.raises(HRankError, match="does not run code a file names"):
            build_from_record(record)
    assert not (tmp_path / "evil.py.ran").exists()
    # named by the user: the file rebuilds, and a file of another model is refused
    loaded = hrank.pipeline.load_model(ref, model_file=tmp_path / "m.pt")
    assert loaded.ref == ref and loaded.model.fc.out_features == 5
    with pytest.raises(HRankError, match="holds"):
        hrank.pipeline.load_model(f"{netmod}:fixed_net", model_file=tmp_path / "m.pt")
    # hrank info too: --model names the code, --model-file the file (a directory holding model.pt works)
    monkeypatch.setattr(models, "_NAMED_BY_USER", set())
    (tmp_path / "d").mkdir()
    (tmp_path / "m.pt").rename(tmp_path / "d" / "model.pt")
    assert main(["info", "--model", f"{netmod}:fixed_net", "--model-file", str(tmp_path / "d")]) == 2
    assert capsys.readouterr().err.endswith(f"holds {ref}, not {netmod}:fixed_net\n")
    assert main(["info", "--model", ref, "--model-file", str(tmp_path / "d")]) == 0
    assert f"{tmp_path / 'd' / 'model.pt'}: {ref}, mode unpruned" in capsys.readouterr().out


def test_a_factory_that_exits_is_a_failed_build(tmp_path: Path):
    (tmp_path / "quits.py").write_text("import sys\ndef make():\n    sys.exit(0)\n")
    assert "building it failed (SystemExit" in _error(f"{tmp_path / 'quits.py'}:make")


def test_factory_hrank_string_one_rate_per_conv(netmod):
    model = models.create(f"{netmod}:make_net")
    spec = Spec.from_string(model, "[0.25]*2+[0.5]")
    assert spec.rates == {"conv1": 0.25, "conv2": 0.25, "conv3": 0.5}
    assert "expects 3" in _error("[0.5]*2", fn=lambda text: Spec.from_string(model, text))


def test_saved_factory_no_longer_importable(netmod, tmp_path: Path):
    ref = f"{netmod}:make_net"
    hrank.save(models.create(ref), tmp_path / "m.pt")
    sys.path.remove(str(tmp_path))
    sys.modules.pop(netmod)
    msg = _error(tmp_path / "m.pt", fn=hrank.load)
    assert f"cannot rebuild the saved model {ref!r}" in msg and "cannot import module" in msg and "builder=" in msg


def test_factory_errors(netmod, tmp_path: Path):
    assert "cannot import module 'no_such_module_hrank'" in _error("no_such_module_hrank:make_net")
    assert f"{netmod} has no attribute 'nope'" in _error(f"{netmod}:nope")
    assert "not a callable" in _error(f"{netmod}:NOT_CALLABLE")
    assert "building it failed (ValueError: boom)" in _error(f"{netmod}:broken")
    assert "returned int, not an nn.Module" in _error(f"{netmod}:not_a_model")
    assert "expected torchvision:NAME" in _error(f"{netmod}:")
    assert "expected torchvision:NAME" in _error(":make_net")
    assert "num_classes must be an integer >= 1" in _error(f"{netmod}:make_net", num_classes=0)
    bad = tmp_path / "bad_import_hrank.py"
    bad.write_text("raise RuntimeError('broken module')\n")
    assert "cannot import module 'bad_import_hrank' (RuntimeError: broken module)" in _error("bad_import_hrank:f")
    msg = _error("resnet_57", fn=models.get_spec)
    assert "unknown model 'resnet_57'" in msg and "module:factory" in msg
    for ref in (f"{netmod}:nope", "no_such_module_hrank:f"):  # get_spec resolves the reference too
        assert ref in _error(ref, fn=models.get_spec)


def test_missing_extras(monkeypatch: pytest.MonkeyPatch):
    for mod in ("torchvision", "torchvision.models", "timm"):
        monkeypatch.setitem(sys.modules, mod, None)  # as if not installed
    assert "pip install 'hrank[vision]'" in _error("torchvision:resnet18")
    assert "pip install timm" in _error("timm:resnet18", fn=models.get_spec)


# -- torchvision and timm ----------------------------------------------------------------------------------------

X64 = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _external_round_trip(ref: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.create(ref, num_classes=10)
    assert model.hrank_arch == ref and model.fc.out_features == 10
    spec = models.get_spec(ref)
    assert (spec.input_size, spec.normalization) == ((3, 224, 224), "imagenet")
    plan = make_plan(model, _scores(model), {"layer*.conv1": 0.5, "layer2.*": 0.25}, example_input=X64[:1])
    pruned = apply_plan(model, plan, example_input=X64[:1]).eval()
    assert pruned.layer1[0].conv1.out_channels == 32
    hrank.save(pruned, tmp_path / "pruned.pt")
    loaded, meta = hrank.load(tmp_path / "pruned.pt")
    assert meta["arch"] == ref and meta["num_classes"] == 10
    with torch.no_grad():
        assert torch.equal(loaded(X64), pruned(X64))

    # weights of the unpruned architecture come from a plain state_dict file
    trained = models.create(ref, num_classes=10).eval()
    torch.save({"state_dict": trained.state_dict()}, tmp_path / "weights.pth")
    fresh = models.create(ref, num_classes=10).eval()
    models.load_checkpoint(fresh, tmp_path / "weights.pth")
    with torch.no_grad():
        assert torch.equal(fresh(X64), trained(X64))
    again = models.create(ref, num_classes=10).eval()
    assert load_weights(again, tmp_path / "weights.pth") == {"normalization": None}
    with torch.no_grad():
        assert torch.equal(again(X64), trained(X64))
    wrong = models.create(ref, num_classes=5)
    assert f"does not fit {ref}" in _error(wrong, fn=models.load_checkpoint, path_or_state=tmp_path / "weights.pth")


def test_torchvision_resnet18(tmp_path: Path):
    pytest.importorskip("torchvision")
    _external_round_trip("torchvision:resnet18", tmp_path)


def test_timm_resnet18(tmp_path: Path):
    pytest.importorskip("timm")
    _external_round_trip("timm:resnet18", tmp_path)


def test_torchvision_conv_classifier_records_num_classes(tmp_path: Path):
    pytest.importorskip("torchvision")
    model = models.create("torchvision:squeezenet1_1", num_classes=10)  # classifier is a conv, no Linear
    assert model_record(model)["num_classes"] == 10
    hrank.save(model, tmp_path / "m.pt")
    loaded, meta = hrank.load(tmp_path / "m.pt")
    assert meta["num_classes"] == 10 and loaded.classifier[1].out_channels == 10


def test_torchvision_timm_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    pytest.importorskip("torchvision")
    pytest.importorskip("timm")
    assert "did you mean resnet18" in _error("torchvision:resnet_18")
    assert "timm has no model 'resnet_18'" in _error("timm:resnet_18")
    hrank.save(models.create("torchvision:resnet18", num_classes=10), tmp_path / "m.pt")
    for mod in ("torchvision", "torchvision.models"):
        monkeypatch.setitem(sys.modules, mod, None)
    msg = _error(tmp_path / "m.pt", fn=hrank.load)
    assert "'torchvision:resnet18'" in msg and "pip install 'hrank[vision]'" in msg
