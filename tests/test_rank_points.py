"""Automatic rank points for every activation (modules, functional, norm+act units), the no-activation
fallback, and compute_ranks on tensors, Datasets, DataLoaders and iterables (docs/ranks.md, "Rank points")."""

from __future__ import annotations

import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

from hrank import models
from hrank.errors import HRankError
from hrank.models.base import RankPoint
from hrank.ranks import Ranks, _act_fn, _data_source, compute_ranks, find_rank_points

SIZE = 16


def _x(n: int = 6, channels: int = 3, size: int = SIZE, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _low_rank(n: int = 6, channels: int = 3, seed: int = 0) -> torch.Tensor:
    """Rank-1 images (one outer product per image, scaled per channel): after a 1x1 conv and BN every map has
    rank <= 2, and any nonlinearity changes that, so a score shows whether the activation was applied."""
    g = torch.Generator().manual_seed(seed)
    u, v = torch.randn(n, 1, SIZE, 1, generator=g), torch.randn(n, 1, 1, SIZE, generator=g)
    return u * v * torch.randn(n, channels, 1, 1, generator=g)


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Random BN statistics and shifts: activations then zero some rows/columns and ranks vary."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.8)
    return model.eval()


def _by_hand(maps: torch.Tensor) -> np.ndarray:
    """The definition: mean torch.linalg.matrix_rank per channel of (N, C, H, W) maps."""
    return torch.linalg.matrix_rank(maps.float()).double().mean(0).numpy()


def _ranks(model: nn.Module, x: torch.Tensor, **kw) -> Ranks:
    return compute_ranks(model, x, num_images=len(x), batch_size=4, method="svd", progress=False, **kw)


class ConvBNAct(nn.Module):
    """conv (1x1) -> BN -> ``act`` (module or function) -> conv2 -> ReLU module."""

    def __init__(self, act: nn.Module | None = None, fn=None, bn: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6) if bn else nn.Identity()
        self.act = act
        self.fn = fn
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) if isinstance(self.bn, nn.BatchNorm2d) else y

    def forward(self, x):
        y = self.pre(x)
        y = self.act(y) if self.act is not None else self.fn(y)
        return self.relu(self.conv2(y)).mean((1, 2, 3))


# --------------------------------------------------------------------------------------------------
# activation modules and functional activations
# --------------------------------------------------------------------------------------------------

ACT_MODULES = [nn.ReLU(), nn.ReLU(inplace=True), nn.ReLU6(), nn.Hardtanh(-0.5, 1.0), nn.SiLU(), nn.GELU(),
               nn.GELU(approximate="tanh"), nn.Hardswish(), nn.Hardsigmoid(), nn.Sigmoid(), nn.Tanh(),
               nn.LeakyReLU(0.2), nn.PReLU(6), nn.ELU(), nn.SELU(), nn.CELU(), nn.Mish(), nn.Softplus()]


@pytest.mark.parametrize("act", ACT_MODULES, ids=lambda m: repr(m))
def test_activation_module_is_the_point(act):
    model = _randomize_bn(ConvBNAct(act=act))
    x = _low_rank()
    assert find_rank_points(model, example_input=x) == {"conv": RankPoint("act"), "conv2": RankPoint("relu")}
    got = _ranks(model, x)
    with torch.no_grad():
        pre = model.pre(x)
        np.testing.assert_array_equal(got.scores["conv"], _by_hand(act(pre.clone())))
    assert np.any(got.scores["conv"] != _by_hand(pre))  # ranked after the activation
    assert got.meta["no_activation"] == [] and got.meta["unranked"] == {}


class Swish(nn.Module):  # the name of timm's (and efficientnet-pytorch's) own activation module
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_foreign_activation_module_by_name():
    model = _randomize_bn(ConvBNAct(act=Swish()))
    x = _low_rank()
    assert find_rank_points(model, example_input=x)["conv"] == RankPoint("act")
    with torch.no_grad():
        np.testing.assert_array_equal(_ranks(model, x).scores["conv"], _by_hand(F.silu(model.pre(x))))


FUNCTIONAL = [
    ("relu", lambda y: F.relu(y)), ("relu", lambda y: F.relu(y, inplace=True)), ("relu", F.relu_),
    ("relu", torch.relu), ("relu", lambda y: y.relu()), ("relu", lambda y: y.relu_()),
    ("relu6", F.relu6), ("relu6", lambda y: F.hardtanh(y, 0.0, 6.0)),
    ("hardtanh:-0.5:2.0", lambda y: F.hardtanh(y, -0.5, 2.0)), ("silu", F.silu),
    ("silu", lambda y: F.silu(y, inplace=True)), ("gelu", F.gelu),
    ("gelu_tanh", lambda y: F.gelu(y, approximate="tanh")), ("hardswish", F.hardswish),
    ("hardsigmoid", F.hardsigmoid), ("sigmoid", torch.sigmoid), ("sigmoid", lambda y: y.sigmoid()),
    ("sigmoid", F.sigmoid), ("tanh", torch.tanh), ("tanh", lambda y: y.tanh_()),
    ("leaky_relu:0.2", lambda y: F.leaky_relu(y, 0.2)), ("leaky_relu:0.01", F.leaky_relu),
    ("elu:0.5", lambda y: F.elu(y, alpha=0.5)), ("selu", F.selu), ("celu:2.0", lambda y: F.celu(y, 2.0)),
    ("mish", F.mish), ("softplus:2.0:20.0", lambda y: F.softplus(y, beta=2)), ("logsigmoid", F.logsigmoid),
]


@pytest.mark.parametrize("spec, fn", FUNCTIONAL, ids=[f"{s}-{i}" for i, (s, _) in enumerate(FUNCTIONAL)])
def test_functional_activation_is_the_producer_plus_act(spec, fn):
    model = _randomize_bn(ConvBNAct(fn=fn))
    x = _low_rank()
    pts = find_rank_points(model, example_input=x)
    assert pts["conv"] == RankPoint("bn", act=spec)
    with torch.no_grad():
        pre = model.pre(x)
        activated = fn(pre.clone())
        assert torch.equal(_act_fn(spec)(pre), activated)  # hrank's table applies the same function
        got = _ranks(model, x)
    np.testing.assert_array_equal(got.scores["conv"], _by_hand(activated))
    assert np.any(got.scores["conv"] != _by_hand(pre))  # the activation was applied before ranking
    assert got.points["conv"].act == spec and got.meta["no_activation"] == []


def test_functional_activation_right_after_the_conv():
    model = _randomize_bn(ConvBNAct(fn=F.silu, bn=False))
    x = _low_rank()
    assert find_rank_points(model, example_input=x)["conv"] == RankPoint("conv", act="silu")
    with torch.no_grad():
        np.testing.assert_array_equal(_ranks(model, x).scores["conv"], _by_hand(F.silu(model.conv(x))))


def test_act_spec_table_and_user_points():
    y = torch.randn(2, 3, 4, 4)
    assert torch.equal(_act_fn("leaky_relu:0.1")(y), F.leaky_relu(y, 0.1))
    for bad in ("swish", "leaky_relu", "leaky_relu:x", "relu:1"):
        with pytest.raises(HRankError, match="unknown rank point activation"):
            _act_fn(bad)
    model = _randomize_bn(ConvBNAct(act=nn.Identity()))
    x = _low_rank()
    got = _ranks(model, x, points={"conv": RankPoint("bn", act="tanh")})
    with torch.no_grad():
        np.testing.assert_array_equal(got.scores["conv"], _by_hand(torch.tanh(model.pre(x))))
    with pytest.raises(HRankError, match="unknown rank point activation 'tan'"):
        _ranks(model, x, points={"conv": RankPoint("bn", act="tan")})


def test_rank_point_json_and_ranks_file_keep_act(tmp_path):
    assert RankPoint("a").to_json() == {"module": "a", "channels": None}  # unchanged without act
    p = RankPoint("bn", (2, 5), call=1, act="leaky_relu:0.2")
    assert p.to_json()["act"] == "leaky_relu:0.2" and RankPoint.from_json(p.to_json()) == p
    model = _randomize_bn(ConvBNAct(fn=F.relu))
    ranks = _ranks(model, _x())
    ranks.save(tmp_path / "r.npz")
    assert Ranks.load(tmp_path / "r.npz", model).points == ranks.points


# --------------------------------------------------------------------------------------------------
# norm + activation units, no-activation fallback, SE blocks, shared weights
# --------------------------------------------------------------------------------------------------

class BNAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm2d subclass whose forward applies BN, then its own children."""

    def __init__(self, c: int, act: nn.Module) -> None:
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = act

    def forward(self, x):
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(self.drop(x))


class WithBNAct(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = BNAct(6, act)
        self.conv2 = nn.Conv2d(6, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.bn(self.conv(x))).mean((1, 2, 3))


@pytest.mark.parametrize("act", [nn.SiLU(), nn.Identity()], ids=["silu", "identity"])
def test_norm_act_unit_output_is_the_point(act):
    model = _randomize_bn(WithBNAct(act))
    x = _x()
    pts = find_rank_points(model, example_input=x)
    assert pts == {"conv": RankPoint("bn"), "conv2": RankPoint("conv2")}
    got = _ranks(model, x)
    with torch.no_grad():
        np.testing.assert_array_equal(got.scores["conv"], _by_hand(model.bn(model.conv(x))))
    assert got.meta["no_activation"] == (["conv", "conv2"] if isinstance(act, nn.Identity) else ["conv2"])


def test_timm_batchnormact2d():
    timm_layers = pytest.importorskip("timm.layers")
    model = _randomize_bn(WithBNAct(nn.Identity()))
    model.bn = timm_layers.BatchNormAct2d(6, act_layer=nn.SiLU)
    _randomize_bn(model)
    x = _x()
    assert find_rank_points(model, example_input=x)["conv"] == RankPoint("bn")
    with torch.no_grad():
        np.testing.assert_array_equal(_ranks(model, x).scores["conv"], _by_hand(model.bn(model.conv(x))))


class Linear(nn.Module):
    """Three no-activation convs: conv -> BN -> residual add, a bare conv, conv -> permute; and BN -> add ->
    F.relu (a functional activation on an unhookable tensor) and BN -> gate multiplication -> ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 3, 1)
        self.proj_bn = nn.BatchNorm2d(3)
        self.bare = nn.Conv2d(3, 3, 3, padding=1)
        self.dw = nn.Conv2d(3, 3, 3, padding=1, groups=3)
        self.lin = nn.Linear(3, 3)
        self.res = nn.Conv2d(3, 3, 3, padding=1)
        self.res_bn = nn.BatchNorm2d(3)
        self.gated = nn.Conv2d(3, 3, 3, padding=1)
        self.gated_bn = nn.BatchNorm2d(3)
        self.relu = nn.ReLU()

    def forward(self, x):
        y = x + self.proj_bn(self.proj(x))
        y = self.bare(y)
        z = self.lin(self.dw(y).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        z = F.relu(self.res_bn(self.res(z)) + z)
        gate = torch.sigmoid(z.mean((2, 3), keepdim=True))
        return self.relu(self.gated_bn(self.gated(z)) * gate)


def test_no_activation_points():
    model = _randomize_bn(Linear())
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every conv gets a point: nothing to warn about
        pts = find_rank_points(model, example_input=x)
    assert pts == {"proj": RankPoint("proj_bn"), "bare": RankPoint("bare"), "dw": RankPoint("dw"),
                   "res": RankPoint("res_bn"), "gated": RankPoint("gated_bn")}
    got = _ranks(model, x)
    assert got.meta["no_activation"] == list(pts)
    with torch.no_grad():
        np.testing.assert_array_equal(got.scores["proj"], _by_hand(model.proj_bn(model.proj(x))))
        np.testing.assert_array_equal(got.scores["dw"], _by_hand(model.dw(model.bare(x + model.proj_bn(
            model.proj(x))))))


class SE(nn.Module):
    """MobileNetV3 block: expand + Hardswish, depthwise + Hardswish, squeeze-excite, linear projection + add."""

    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.Hardswish())
        self.fc1 = nn.Conv2d(8, 4, 1)
        self.fc_act = nn.ReLU()
        self.fc2 = nn.Conv2d(4, 8, 1)
        self.gate = nn.Hardsigmoid()
        self.project = nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.dw(self.expand(x))
        s = self.gate(self.fc2(self.fc_act(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        return x + self.project(y * s)


def test_squeeze_excite_block():
    model = _randomize_bn(SE())
    x = _x(channels=4)
    pts = find_rank_points(model, example_input=x)
    assert pts == {"expand.0": RankPoint("expand.2"), "dw.0": RankPoint("dw.2"), "fc1": RankPoint("fc_act"),
                   "fc2": RankPoint("gate"), "project.0": RankPoint("project.1")}
    got = _ranks(model, x)
    assert got.spatial["fc1"] == got.spatial["fc2"] == (1, 1)  # degenerate: rank 0 or 1
    assert all(set(got.scores[c] * len(x)) <= set(range(len(x) + 1)) for c in ("fc1", "fc2"))
    assert got.meta["no_activation"] == ["project.0"]
    with torch.no_grad():
        y = model.dw(model.expand(x))
        s = model.gate(model.fc2(model.fc_act(model.fc1(F.adaptive_avg_pool2d(y, 1)))))
        np.testing.assert_array_equal(got.scores["fc2"], _by_hand(s))
        np.testing.assert_array_equal(got.scores["project.0"], _by_hand(model.project(y * s)))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU()
        self.first = nn.Conv2d(3, 3, 3, padding=1)
        self.silu = nn.SiLU()

    def forward(self, x):
        y = self.first(x)  # two uses: the ReLU module runs first, so it wins over the later SiLU
        a = self.relu(y)
        return self.conv(self.conv(a)) + self.silu(y)


def test_shared_weights_unranked_and_earliest_activation_wins():
    model = Shared()
    with pytest.warns(UserWarning, match="not ranked.*conv: runs 2 times"):
        pts = find_rank_points(model, example_input=_x())
    assert pts == {"first": RankPoint("relu")}
    with pytest.raises(HRankError, match="runs 2 times"):
        find_rank_points(model, convs=["conv"], example_input=_x())


def test_registry_points_unchanged():
    model = models.create("resnet_56")
    assert find_rank_points(model) == models.rank_points(model)
    assert all(p.act is None for p in models.rank_points(model).values())
    with torch.device("meta"):
        g = models.create("googlenet")
    assert find_rank_points(g) == models.rank_points(g)


# --------------------------------------------------------------------------------------------------
# compute_ranks input types
# --------------------------------------------------------------------------------------------------

class Items(Dataset):
    """A map-style Dataset of image tensors (``pairs``: (image, label) pairs)."""

    def __init__(self, images: torch.Tensor, pairs: bool) -> None:
        self.images, self.pairs = images, pairs

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return (self.images[i], i % 3) if self.pairs else self.images[i]


class Stream(IterableDataset):
    def __init__(self, images: torch.Tensor) -> None:
        self.images = images

    def __iter__(self):
        return iter(self.images)


def test_every_input_type_gives_the_same_ranks():
    model = _randomize_bn(ConvBNAct(fn=F.relu))
    x = _x(14)
    labels = torch.zeros(14, dtype=torch.long)
    kw = dict(num_images=11, batch_size=4, progress=False)
    ref = compute_ranks(model, [x[:4], x[4:8], x[8:11]], **kw)
    sources = {"tensor": x, "tensor_dataset": TensorDataset(x, labels), "items": Items(x, False),
               "pairs": Items(x, True), "iterable_dataset": Stream(x), "loader": DataLoader(TensorDataset(x, labels),
                                                                                            batch_size=5),
               "pair_list": [(x[:6], labels[:6]), (x[6:], labels[6:])], "generator": (b for b in x.split(3))}
    for name, data in sources.items():
        got = compute_ranks(model, data, **kw)
        assert got.num_images == 11, name
        for conv, s in ref.scores.items():
            np.testing.assert_array_equal(got.scores[conv], s, err_msg=name)
    with torch.no_grad():
        np.testing.assert_array_equal(ref.scores["conv"], _by_hand(F.relu(model.pre(x[:11]))))


def test_indexable_data_is_sharded_in_blocks_like_an_imageset():
    x = _x(10)
    for data in (x, TensorDataset(x)):
        parts = []
        for rank in (0, 1, 2):
            source, total = _data_source(data, 7, 2, rank, 3)
            batches = [b[0] if isinstance(b, (list, tuple)) else b for b in source]
            assert total == len(batches)
            parts.append(torch.cat(batches))
        assert [len(p) for p in parts] == [2, 2, 3] and torch.equal(torch.cat(parts), x[:7])


def test_input_type_errors():
    model = ConvBNAct(fn=F.relu)
    kw = dict(num_images=4, progress=False)
    with pytest.raises(HRankError, match="tensor of images must be float .* uint8 of shape"):
        compute_ranks(model, torch.zeros(4, 3, 8, 8, dtype=torch.uint8), **kw)
    with pytest.raises(HRankError, match=r"float \(N, C, H, W\).*\(3, 8, 8\)"):
        compute_ranks(model, torch.zeros(3, 8, 8), **kw)
    with pytest.raises(HRankError, match="image tensor has 2 images, fewer than num_images=4"):
        compute_ranks(model, torch.zeros(2, 3, 8, 8), **kw)
    with pytest.raises(HRankError, match="dataset TensorDataset has 3 items, fewer than num_images=4"):
        compute_ranks(model, TensorDataset(torch.zeros(3, 3, 8, 8)), **kw)

    class Names(Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return object()

    with pytest.raises(HRankError, match=r"dataset items must be image tensors \(C, H, W\)"):
        compute_ranks(model, Names(), **kw)
    with pytest.raises(HRankError, match="data must be an ImageSet.*got dict"):
        compute_ranks(model, {"images": torch.zeros(4, 3, 8, 8)}, **kw)


class _SpaceToDepth(nn.Module):
    """TResNet's stem: 2x2 space-to-depth (3 -> 12 channels) before the first conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(12, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(F.pixel_unshuffle(x, 2))))


def test_first_conv_reading_rearranged_images_is_ranked_and_wrong_channels_are_one_line():
    # the first conv reads 12 channels of 3-channel images: not an error when the model runs on them
    torch.manual_seed(0)
    model = _SpaceToDepth().eval()
    ranks = compute_ranks(model, torch.randn(4, 3, 16, 16), num_images=4, progress=False)
    assert ranks.scores["conv"].shape == (8,)
    # the same model on 1-channel images fails, and says so in the terms of its first conv
    with pytest.raises(HRankError, match="images have 1 channels, the model's first conv expects 12"):
        compute_ranks(model, torch.randn(4, 1, 16, 16), num_images=4, progress=False)
    with pytest.raises(HRankError, match="images have 1 channels, the model's first conv expects 3"):
        compute_ranks(ConvBNAct(fn=F.relu), torch.randn(4, 1, 8, 8), num_images=4, progress=False)


# --------------------------------------------------------------------------------------------------
# torchvision models: every conv that runs once gets a point
# --------------------------------------------------------------------------------------------------

TORCHVISION = [("efficientnet_b0", {}, 32), ("mobilenet_v3_small", {}, 32), ("mobilenet_v2", {}, 32),
               ("googlenet", {"aux_logits": False, "init_weights": True}, 32),
               ("inception_v3", {"aux_logits": False, "init_weights": True}, 75), ("densenet121", {}, 32),
               ("convnext_tiny", {}, 32), ("regnet_x_400mf", {}, 32)]


@functools.cache
def _torchvision(name: str) -> nn.Module:
    """A randomly initialized torchvision model in eval mode, built once per session (the build dominates)."""
    tvm = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return getattr(tvm, name)(**dict(next(t[1] for t in TORCHVISION if t[0] == name))).eval()


@pytest.mark.parametrize("name, kwargs, size", TORCHVISION, ids=[t[0] for t in TORCHVISION])
def test_torchvision_every_conv_gets_a_point(name, kwargs, size):
    model = _torchvision(name)
    calls: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    once = [c for c, k in calls.items() if k == 1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pts = find_rank_points(model, example_input=x)
    assert sorted(pts) == sorted(once) and len(once) == len(calls)
    if name in ("googlenet", "inception_v3"):  # BasicConv2d: conv -> bn -> F.relu
        assert all(p.act == "relu" for p in pts.values())
    if name == "densenet121":  # the last conv: norm5 -> F.relu
        assert pts["features.denseblock4.denselayer16.conv2"] == RankPoint("features.norm5", (992, 1024),
                                                                           act="relu")


def test_torchvision_googlenet_ranks_with_functional_points():
    model = _torchvision("googlenet")
    x = torch.randn(1, 3, 32, 32)
    got = compute_ranks(model, x, num_images=1, batch_size=1, progress=False, method="svd",
                        convs=["conv1.conv", "inception3a.branch2.1.conv"])
    assert got.points["conv1.conv"] == RankPoint("conv1.bn", act="relu")
    with torch.no_grad():
        np.testing.assert_array_equal(got.scores["conv1.conv"], _by_hand(F.relu(model.conv1.bn(model.conv1.conv(x)))))
