"""Models: forward passes, state_dict keys/shapes against the official definitions, registry facts, loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrank import models
from hrank.errors import HRankError
from hrank.models.base import ChannelPadShortcut

OFFICIAL = ["vgg_16_bn", "resnet_56", "resnet_110", "densenet_40", "googlenet", "resnet_50"]
ENTRIES = {"vgg_16_bn": 13, "resnet_56": 55, "resnet_110": 109, "densenet_40": 39, "googlenet": 10, "resnet_50": 53}


@pytest.fixture(scope="module")
def reference_keys(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "state_dict_keys.json").read_text())


@pytest.mark.parametrize("name", OFFICIAL)
def test_state_dict_keys_and_shapes_match_official(name, reference_keys):
    model = models.create(name)
    got = [[k, list(v.shape)] for k, v in model.state_dict().items()]
    assert got == reference_keys[name]["state_dict"]


@pytest.mark.parametrize("name", models.names())
def test_forward_shape_and_num_classes(name):
    spec = models.get_spec(name)
    size = spec.input_size if spec.dataset == "cifar" else (3, 64, 64)
    for classes in (spec.num_classes, 100):
        model = models.create(name, num_classes=classes).eval()
        with torch.no_grad():
            out = model(torch.randn(2, *size))
        assert out.shape == (2, classes)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", OFFICIAL)
def test_rate_entries_follow_official_order(name, reference_keys):
    model = models.create(name)
    entries = models.rate_entries(model)
    assert len(entries) == ENTRIES[name] == reference_keys[name]["num_compress_rate_entries"]
    convs = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for entry in entries:
        assert entry and all(c in convs for c in entry)
    # the model constructor's rate index for each conv, from the official definitions
    official = {c["name"]: c["model_rate_index"] for c in reference_keys[name]["conv2d_forward_order"]}
    mine = {conv: i for i, entry in enumerate(entries) for conv in entry}
    for conv, idx in mine.items():
        if name == "googlenet" and conv.startswith("inception_c4"):
            assert official[conv] == 6 and idx == 5  # the official constructor's bug; masks use entry 5
        else:
            assert official[conv] == idx, conv


@pytest.mark.parametrize("name", OFFICIAL)
def test_rank_points_exist_and_slices_fit(name):
    model = models.create(name).eval()
    points = models.rank_points(model)
    spec = models.get_spec(name)
    modules = dict(model.named_modules())
    shapes: dict[str, torch.Size] = {}

    def record(key):
        def hook(module, inputs, output):
            shapes[key] = output.shape
        return hook

    hooks = [modules[p.module].register_forward_hook(record(p.module)) for p in points.values()]
    size = spec.input_size if spec.dataset == "cifar" else (3, 64, 64)
    with torch.no_grad():
        model(torch.randn(1, *size))
    for h in hooks:
        h.remove()
    for conv, point in points.items():
        width = modules[conv].out_channels
        channels = shapes[point.module][1]
        lo, hi = point.channels or (0, channels)
        assert 0 <= lo < hi <= channels and hi - lo == width, (conv, point)


def test_vgg_last_conv_has_no_rank_point_and_fixed_zero_entry():
    assert "features.conv16" not in models.rank_points("vgg_16_bn")
    assert models.get_spec("vgg_16_bn").fixed_zero_entries == {12}


def test_channel_pad_shortcut_equals_option_a_padding():
    sc = ChannelPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(sc(x), ref)
    assert list(sc.state_dict()) == []  # no keys: official checkpoints load strictly
    sc.set_mapping(3, 5, [0, 2], [4, 1])
    y = sc(torch.arange(3.0).view(1, 3, 1, 1).repeat(1, 1, 2, 2))
    assert y[0, :, 0, 0].tolist() == [0.0, 2.0, 0.0, 0.0, 0.0]


def test_unknown_model_lists_known_ones():
    with pytest.raises(HRankError, match="known models: .*resnet_56"):
        models.create("resnet_57")


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def test_load_checkpoint_wrappers_prefixes_and_renames(tmp_path):
    src = models.create("resnet_20")
    sd = src.state_dict()
    # DataParallel prefix, classifier named linear (akamaster layout), wrapped under "state_dict"
    renamed = {"module." + k.replace("fc.", "linear."): v for k, v in sd.items()}
    for wrap in ("state_dict", "model", "net"):
        dst = models.create("resnet_20")
        extra = models.load_checkpoint(dst, _save({wrap: renamed, "best_prec1": 91.5}, tmp_path / f"{wrap}.th"))
        assert extra == {"best_prec1": 91.5}
        for k, v in dst.state_dict().items():
            assert torch.equal(v, sd[k]), k
    # and back: a checkpoint with fc into resnet_110, whose classifier is "linear"
    r110 = models.create("resnet_110")
    sd110 = {k.replace("linear.", "fc."): v for k, v in r110.state_dict().items()}
    models.load_checkpoint(models.create("resnet_110"), _save(sd110, tmp_path / "r110.pt"))


def test_load_checkpoint_without_bn_counters(tmp_path):
    sd = {k: v for k, v in models.create("resnet_20").state_dict().items() if "num_batches_tracked" not in k}
    models.load_checkpoint(models.create("resnet_20"), _save(sd, tmp_path / "old.pt"))


def test_load_checkpoint_mismatch_is_one_clear_error(tmp_path):
    sd = models.create("resnet_20").state_dict()
    sd.pop("layer1.0.conv1.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(HRankError) as e:
        models.load_checkpoint(models.create("resnet_20"), _save(sd, tmp_path / "bad.pt"))
    msg = str(e.value)
    assert "missing 1: layer1.0.conv1.weight" in msg and "unexpected 1: extra.weight" in msg
    assert "\n" not in msg
    with pytest.raises(HRankError, match="shape mismatch"):
        models.load_checkpoint(models.create("resnet_20"), _save(models.create("resnet_32").state_dict() | {
            k: v for k, v in models.create("resnet_20", num_classes=100).state_dict().items()
            if k.startswith("fc.")}, tmp_path / "shape.pt"))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_load_checkpoint_never_unpickles_code(tmp_path, capsys):
    path = _save({"state_dict": models.create("resnet_20").state_dict(), "x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(HRankError, match="cannot read checkpoint"):
        models.load_checkpoint(models.create("resnet_20"), path)
    assert "code ran" not in capsys.readouterr().out


def test_load_checkpoint_missing_and_garbage_files(tmp_path):
    with pytest.raises(HRankError, match="not found"):
        models.load_checkpoint(models.create("resnet_20"), tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(HRankError, match="cannot read"):
        models.load_checkpoint(models.create("resnet_20"), tmp_path / "garbage.pt")
    _save({"epoch": 3}, tmp_path / "nostate.pt")
    with pytest.raises(HRankError, match="no state_dict"):
        models.load_checkpoint(models.create("resnet_20"), tmp_path / "nostate.pt")


@pytest.mark.integration
def test_pretrained_resnet56_loads_and_is_accurate(pretrained_resnet56, real_cifar10):
    from hrank.data import Batches, load_batch_files

    model = models.create("resnet_56")
    assert models.load_checkpoint(model, pretrained_resnet56)["best_prec1"] == pytest.approx(93.62)
    lossless = load_batch_files([real_cifar10 / "lossless_subset" / "test_batch_first1000"], 10)
    correct = 0
    model.eval()
    with torch.no_grad():
        for x, y in Batches(lossless, 500, normalization="imagenet"):
            correct += int((model(x).argmax(1) == y).sum())
    assert correct == 926  # 92.6%, as measured in shared/data/README.md
