"""Rank generation: exact batched ranks, rank points (registry and automatic), compute_ranks, the Ranks file,
the official import and the ``hrank rank`` command."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrank import models
from hrank.cli import main as cli_main
from hrank.data import ImageSet, load_cifar
from hrank.errors import HRankError
from hrank.models.base import RankPoint
from hrank.ranks import Ranks, compute_ranks, find_rank_points, matrix_ranks, model_fingerprint

OFFICIAL_ARCHS = ["vgg_16_bn", "resnet_56", "resnet_110", "densenet_40", "googlenet", "resnet_50"]


# --------------------------------------------------------------------------------------------------
# helpers and test models
# --------------------------------------------------------------------------------------------------

def low_rank_maps(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Maps of every rank 0..min(h, w), some with zeroed rows/columns, some after ReLU, some all zero."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        r = i % (min(h, w) + 1)
        m = torch.randn(h, r, generator=g) @ torch.randn(r, w, generator=g)
        kind = i % 5
        if kind == 1:
            m[torch.rand(h, generator=g) < 0.4] = 0  # zero rows
        elif kind == 2:
            m[:, torch.rand(w, generator=g) < 0.4] = 0  # zero columns
        elif kind == 3:
            m = m.relu()
        elif kind == 4 and i % 3 == 0:
            m = torch.zeros(h, w)
        out.append(m * 10 ** float(torch.randint(-3, 4, (1,), generator=g)))
    return torch.stack(out)


class _BasicBlock(nn.Module):
    """torchvision-style: one ``relu`` module called twice, ``out += identity``, optional downsample."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TVResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(_BasicBlock(8, 8), _BasicBlock(8, 16, 2))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _InvertedResidual(nn.Module):
    """MobileNetV2: expand 1x1 + ReLU6, depthwise 3x3 + ReLU6, linear projection (BN, no activation)."""

    def __init__(self, cin: int, cout: int, expand: int = 4) -> None:
        super().__init__()
        mid = cin * expand
        self.use_res = cin == cout
        self.conv = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, mid, 3, 1, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU6(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2ish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.blocks = nn.Sequential(_InvertedResidual(8, 8), _InvertedResidual(8, 12))
        self.head = nn.Linear(12, 10)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class DenseCat(nn.Module):
    """A dense unit: the conv's output is concatenated after the input, then BN-ReLU (a channel slice)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.relu0 = nn.ReLU()
        self.grow = nn.Conv2d(6, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(10)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(10, 2)

    def forward(self, x):
        x = self.relu0(self.bn0(self.stem(x)))
        x = torch.cat([x, self.grow(x)], 1)
        return self.fc(self.relu(self.bn(x)).mean((2, 3)))


class FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv2(F.relu(self.bn(self.conv(x))))).mean((1, 2, 3))


class NoConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def images(n: int = 24, seed: int = 0, size: int = 32, channels: int = 3) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    return ImageSet(imgs, torch.zeros(n, dtype=torch.long), [str(i) for i in range(10)], "random")


def make_model(arch: str = "resnet_20", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = models.create(arch)
    # random BN statistics make post-ReLU maps as varied as a trained network's
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def reference_ranks(model: nn.Module, batches: list[torch.Tensor], points: dict[str, RankPoint]) -> dict:
    """The definition, written plainly: hook every point and call torch.linalg.matrix_rank on every map."""
    sums: dict[str, torch.Tensor] = {}
    calls: dict[str, int] = {}
    modules = dict(model.named_modules())
    handles = []
    for name in {p.module for p in points.values()}:
        def hook(m, a, out, name=name):
            k = calls.get(name, 0)
            calls[name] = k + 1
            for conv, p in points.items():
                if p.module == name and (p.call or 0) == k:
                    lo, hi = p.channels or (0, out.shape[1])
                    r = torch.linalg.matrix_rank(out[:, lo:hi].float()).double().sum(0)
                    sums[conv] = sums.get(conv, 0) + r
        handles.append(modules[name].register_forward_hook(hook))
    model.eval()
    with torch.no_grad():
        for x in batches:
            calls.clear()
            model(x)
    for h in handles:
        h.remove()
    n = sum(x.shape[0] for x in batches)
    return {c: (s / n).numpy() for c, s in sums.items()}


def _batches_of(ranks_data: ImageSet, n: int, bs: int, seed: int = 0, augment: bool = True) -> list[torch.Tensor]:
    """The exact images compute_ranks uses, reproduced through its public behaviour (iterable input)."""
    captured: list[torch.Tensor] = []

    class Spy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 1)
            self.relu = nn.ReLU()

        def forward(self, x):
            captured.append(x.clone())
            return self.relu(self.conv(x))

    compute_ranks(Spy(), ranks_data, num_images=n, batch_size=bs, seed=seed, augment=augment, progress=False,
                  points={"conv": "relu"})
    return captured


# --------------------------------------------------------------------------------------------------
# 1. exact batched ranks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(32, 32), (16, 16), (8, 8), (7, 5), (5, 9), (1, 1), (1, 6), (40, 40)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_matrix_ranks_equal_matrix_rank_per_map(shape, method):
    h, w = shape
    maps = low_rank_maps(240, h, w, seed=h * 100 + w)
    expected = torch.stack([torch.linalg.matrix_rank(m) for m in maps])  # one call per map: the definition
    got = matrix_ranks(maps, method=method)
    assert got.dtype == torch.int64 and got.shape == (240,)
    assert torch.equal(got, expected)
    assert (got == 0).sum() >= 1 and got.max() == min(h, w)


def test_matrix_ranks_chunks_workers_and_strided_input_agree():
    maps = low_rank_maps(300, 12, 12, seed=3).view(20, 15, 12, 12)
    full = matrix_ranks(maps)
    assert full.shape == (20, 15)
    for chunk, workers in [(144 * 5, 1), (144 * 7, 2), (10 ** 7, 3)]:
        assert torch.equal(matrix_ranks(maps, chunk_elems=chunk, workers=workers), full)
    sliced = maps[:, 3:11]  # a channel slice of an activation: not contiguous
    assert not sliced.is_contiguous()
    assert torch.equal(matrix_ranks(sliced, chunk_elems=144 * 3, workers=2), full[:, 3:11])
    assert torch.equal(matrix_ranks(maps[0, 0]), full[0, 0])  # a single map


def test_matrix_ranks_tolerance_is_matrix_ranks():
    # singular values straddling sigma_max * max(H, W) * eps32: both sides of the threshold
    eps = torch.finfo(torch.float32).eps
    u, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    maps = []
    for factor in (0.25, 0.5, 2.0, 4.0, 30.0):
        s = torch.ones(16, dtype=torch.float64)
        s[8:] = 16 * eps * factor
        maps.append((u * s) @ u.T)
    maps = torch.stack(maps).float()
    assert torch.equal(matrix_ranks(maps), torch.linalg.matrix_rank(maps))
    assert matrix_ranks(maps).tolist() == [8, 8, 16, 16, 16]


def _maps_with_singular_values(h: int, w: int, small: list[float], seed: int) -> torch.Tensor:
    """float32 maps U diag(s) V^T with s = (1, ..., 1, t, ..., t): the top half 1, the bottom half t for each t."""
    g = torch.Generator().manual_seed(seed)
    k = min(h, w)
    u, _ = torch.linalg.qr(torch.randn(h, k, dtype=torch.float64, generator=g))
    v, _ = torch.linalg.qr(torch.randn(w, k, dtype=torch.float64, generator=g))
    maps = []
    for t in small:
        s = torch.ones(k, dtype=torch.float64)
        s[k // 2:] = t
        maps.append((u * s) @ v.T)
    return torch.stack(maps).float()


@pytest.mark.parametrize("shape", [(4, 32), (32, 4), (7, 56), (56, 7), (5, 40), (12, 20), (20, 12), (3, 9)])
@pytest.mark.parametrize("method", ["gram", "svd"])
def test_matrix_ranks_tolerance_on_non_square_maps(shape, method):
    """The threshold is sigma_max * max(H, W) * eps32 (matrix_rank's), not min(H, W): on non-square maps
    singular values between the two thresholds tell them apart."""
    h, w = shape
    k, eps = min(h, w), torch.finfo(torch.float32).eps
    factors = (0.25, 0.5, 0.75, 2.0, 4.0, 30.0)  # times max(H, W) * eps: below, below, below, above, ...
    maps = _maps_with_singular_values(h, w, [max(h, w) * eps * f for f in factors], seed=h * 100 + w)
    got = matrix_ranks(maps, method=method)
    assert torch.equal(got, torch.linalg.matrix_rank(maps))
    assert torch.equal(got, torch.stack([torch.linalg.matrix_rank(m) for m in maps]))
    assert got.tolist() == [k // 2 if f < 1 else k for f in factors]


def test_matrix_ranks_tolerance_uses_the_long_side():
    """A 4x32 map with singular values (1, 1, 16 eps, 16 eps): rank 2 (threshold 32 eps), where a min(H, W)
    threshold (4 eps) would count all 4."""
    eps = torch.finfo(torch.float32).eps
    for h, w in ((4, 32), (32, 4)):
        m = _maps_with_singular_values(h, w, [16 * eps], seed=7)
        sv = torch.linalg.svdvals(m.double())[0]
        assert int((sv > sv[0] * min(h, w) * eps).sum()) == 4  # what a min(H, W) threshold would give
        assert int(torch.linalg.matrix_rank(m)[0]) == 2
        for method in ("gram", "svd"):
            assert matrix_ranks(m, method=method).tolist() == [2]
            assert matrix_ranks(m[0], method=method).item() == 2


def test_matrix_ranks_bad_input():
    with pytest.raises(HRankError):
        matrix_ranks(torch.zeros(5))
    with pytest.raises(HRankError, match="unknown rank method"):
        matrix_ranks(torch.zeros(2, 3, 3), method="qr")
    assert matrix_ranks(torch.zeros(0, 4, 4)).shape == (0,)
    maps = low_rank_maps(6, 5, 5, seed=1)
    maps[2, 1, 1], maps[4, 0, 3] = float("nan"), float("inf")
    for method in ("gram", "svd"):  # NaN/inf maps are flagged -1, the others are unaffected
        got = matrix_ranks(maps, method=method)
        assert got[2] == got[4] == -1
        assert torch.equal(got[[0, 1, 3, 5]], torch.linalg.matrix_rank(maps[[0, 1, 3, 5]]))


# --------------------------------------------------------------------------------------------------
# 2. rank points
# --------------------------------------------------------------------------------------------------

def test_registry_points_are_the_defaults():
    model = models.create("resnet_20")
    assert find_rank_points(model) == models.rank_points(model)


@pytest.mark.parametrize("arch", ["resnet_20", "resnet_50"])
def test_discovery_reproduces_hrank_points_on_resnets(arch):
    model = models.create(arch)
    registry = models.rank_points(model)
    del model.hrank_arch
    size = 224 if arch == "resnet_50" else 32
    auto = find_rank_points(model, example_input=torch.zeros(1, 3, size, size))
    if arch == "resnet_50":  # HRank scores the stem after the max-pool; the first ReLU is one step earlier
        assert auto.pop("conv1") == RankPoint("relu") and registry.pop("conv1") == RankPoint("maxpool")
    assert auto == registry


def test_discovery_torchvision_block_relu_called_twice():
    pts = find_rank_points(TVResNet(), example_input=torch.zeros(1, 3, 32, 32))
    assert pts["conv1"] == RankPoint("relu")
    for b in ("layer1.0", "layer1.1"):
        assert pts[f"{b}.conv1"] == RankPoint(f"{b}.relu", call=0)
        assert pts[f"{b}.conv2"] == RankPoint(f"{b}.relu", call=1)  # after the residual add
    assert pts["layer1.1.downsample.0"] == RankPoint("layer1.1.relu", call=1)


def test_discovery_mobilenet_projection_is_ranked_at_its_bn():
    model = MobileNetV2ish()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every conv has a point now
        pts = find_rank_points(model, example_input=torch.zeros(1, 3, 32, 32))
    assert pts["stem.0"] == RankPoint("stem.2")
    assert pts["blocks.0.conv.0"] == RankPoint("blocks.0.conv.2")
    assert pts["blocks.0.conv.3"] == RankPoint("blocks.0.conv.5")  # depthwise conv, ReLU6
    # linear bottleneck (BN -> residual add -> next conv, no activation): its own BN output
    assert pts["blocks.0.conv.6"] == RankPoint("blocks.0.conv.7")
    assert pts["blocks.1.conv.6"] == RankPoint("blocks.1.conv.7")


def test_discovery_concat_slice_and_functional_relu():
    pts = find_rank_points(DenseCat(), example_input=torch.zeros(1, 3, 8, 8))
    assert pts == {"stem": RankPoint("relu0"), "grow": RankPoint("relu", (6, 10))}
    pts = find_rank_points(FunctionalRelu(), example_input=torch.zeros(1, 3, 8, 8))
    assert pts == {"conv": RankPoint("bn", act="relu"), "conv2": RankPoint("act")}  # F.relu(bn(x)): bn + relu


def test_discovery_matches_registry_on_densenet_transitions_and_vgg():
    model = models.create("densenet_40")
    registry = models.rank_points(model)
    del model.hrank_arch
    auto = find_rank_points(model, example_input=torch.zeros(1, 3, 32, 32))
    assert auto == registry  # through the concatenation, and through the transition's pooling
    vgg = models.create("vgg_16_bn")
    del vgg.hrank_arch
    auto = find_rank_points(vgg, example_input=torch.zeros(1, 3, 32, 32))
    assert auto["features.conv0"] == RankPoint("features.relu0")
    assert auto["features.conv1"] == RankPoint("features.relu1")  # the first ReLU (HRank: the pool after it)


def test_no_convs_and_bad_points():
    with pytest.raises(HRankError, match="no Conv2d"):
        find_rank_points(NoConv())
    with pytest.raises(HRankError, match="no Conv2d"):
        compute_ranks(NoConv(), images(4), num_images=2, progress=False)
    model = make_model()
    with pytest.raises(HRankError, match="not a Conv2d"):
        compute_ranks(model, images(4), num_images=2, points={"fc": "relu"}, progress=False)
    with pytest.raises(HRankError, match="no module"):
        compute_ranks(model, images(4), num_images=2, points={"conv1": "nope"}, progress=False)
    with pytest.raises(HRankError, match="does not match its 16 filters"):
        compute_ranks(model, images(4), num_images=2, points={"conv1": "layer2.0.relu2"}, progress=False)
    with pytest.raises(HRankError, match="channels 0:8"):
        compute_ranks(model, images(4), num_images=2, points={"conv1": RankPoint("relu", (0, 8))}, progress=False)


# --------------------------------------------------------------------------------------------------
# 3. compute_ranks
# --------------------------------------------------------------------------------------------------

def test_compute_ranks_equals_the_definition():
    model = make_model()
    data = images(30)
    batches = _batches_of(data, 20, 8)
    assert [b.shape[0] for b in batches] == [8, 8, 4]
    expected = reference_ranks(model, batches, models.rank_points(model))
    got = compute_ranks(model, data, num_images=20, batch_size=8, method="svd", progress=False)
    assert got.num_images == 20 and list(got.scores) == models.prunable_convs(model)
    for conv, s in expected.items():
        assert got.scores[conv].dtype == np.float64
        np.testing.assert_array_equal(got.scores[conv], s)
    fast = compute_ranks(model, data, num_images=20, batch_size=8, progress=False)  # the default: gram
    # The gram path may in principle disagree with matrix_rank on a map whose singular value sits within
    # float32 noise of the threshold (2 of 1,016,000 maps in docs/ranks.md). On these 20 images x 688 filters
    # the measured difference is 0 maps (was allowed up to ~13 rank units), so any difference is a regression.
    for conv, s in expected.items():
        np.testing.assert_array_equal(fast.scores[conv], s, err_msg=conv)
    assert got.spatial["conv1"] == (32, 32) and got.spatial["layer3.2.conv2"] == (8, 8)
    assert got.fingerprint == model_fingerprint(model) and got.arch == "resnet_20"
    assert got.meta["source"] == "computed" and got.meta["seed"] == 0 and got.meta["augment"] is True


def test_one_forward_per_batch_every_point_once():
    model = make_model()
    forwards, fires = [], {}
    model.register_forward_pre_hook(lambda m, a: forwards.append(a[0].shape[0]))
    for p in models.rank_points(model).values():
        model.get_submodule(p.module).register_forward_hook(
            lambda m, a, o, name=p.module: fires.__setitem__(name, fires.get(name, 0) + 1))
    compute_ranks(model, images(20), num_images=20, batch_size=6, progress=False)
    assert forwards == [6, 6, 6, 2]
    assert set(fires.values()) == {4}


def test_state_and_hooks_restored_even_on_error():
    model = make_model()
    model.train()
    model.layer1[0].bn1.eval()
    before = {n: m.training for n, m in model.named_modules()}
    compute_ranks(model, images(8), num_images=8, batch_size=4, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before
    model.layer2[1].bn2.weight.data[3] = float("nan")
    with pytest.raises(HRankError, match="non-finite.*layer2.1.relu2.*layer2.1.conv2"):
        compute_ranks(model, images(8), num_images=8, batch_size=4, progress=False)
    assert {n: m.training for n, m in model.named_modules()} == before
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_seeded_draw_augmentation_and_sharding():
    data = images(50)
    a = _batches_of(data, 20, 8, seed=1)
    b = _batches_of(data, 20, 20, seed=1)
    assert torch.equal(torch.cat(a), torch.cat(b))  # the same images and crops whatever the batch size
    c = _batches_of(data, 20, 8, seed=2)
    assert not torch.equal(torch.cat(a), torch.cat(c))
    plain = torch.cat(_batches_of(data, 20, 8, seed=1, augment=False))
    assert not torch.equal(torch.cat(a), plain)
    # without augmentation the images are the seeded draw itself, normalized
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(50, generator=g)[:20]
    from hrank.data import Normalization, normalize
    assert torch.allclose(plain, normalize(data.images[order], Normalization.get("cifar")))


def test_iterable_input_and_overrides():
    model = make_model()
    data = images(24)
    batches = _batches_of(data, 24, 8)
    from_iter = compute_ranks(model, [(x, torch.zeros(len(x))) for x in batches], num_images=20, method="svd",
                              progress=False)
    ref = reference_ranks(model, [batches[0], batches[1], batches[2][:4]], models.rank_points(model))
    assert from_iter.num_images == 20 and from_iter.meta["seed"] is None
    for conv in ref:
        np.testing.assert_array_equal(from_iter.scores[conv], ref[conv])
    only = compute_ranks(model, batches, num_images=8, convs=["layer1.0.conv1"],
                         points={"layer1.0.conv1": "layer1.0.relu2"}, progress=False)
    assert list(only.scores) == ["layer1.0.conv1"] and only.points["layer1.0.conv1"] == RankPoint("layer1.0.relu2")
    np.testing.assert_array_equal(only.scores["layer1.0.conv1"],
                                  compute_ranks(model, batches, num_images=8, progress=False).scores["layer1.0.conv2"])


def test_auto_points_in_compute_ranks_with_call_index_and_unranked():
    torch.manual_seed(0)
    model = TVResNet()
    data = images(16)
    got = compute_ranks(model, data, num_images=16, batch_size=8, method="svd", progress=False)
    assert got.arch is None and got.points["layer1.1.conv2"] == RankPoint("layer1.1.relu", call=1)
    expected = reference_ranks(model, _batches_of(data, 16, 8), got.points)
    for conv in expected:
        np.testing.assert_array_equal(got.scores[conv], expected[conv])
    mob = compute_ranks(MobileNetV2ish(), data, num_images=4, progress=False)
    assert mob.meta["unranked"] == {} and mob.points["blocks.0.conv.6"] == RankPoint("blocks.0.conv.7")
    assert mob.meta["no_activation"] == ["blocks.0.conv.6", "blocks.1.conv.6"]
    with pytest.raises(HRankError, match="more than once"):
        compute_ranks(model, data, num_images=4, points={"conv1": "layer1.0.relu"}, progress=False)


@pytest.mark.parametrize("arch", ["densenet_40", "googlenet", "vgg_16_bn"])
def test_registry_slices_on_other_archs(arch):
    model = make_model(arch)
    got = compute_ranks(model, images(3), num_images=3, batch_size=3, progress=False)
    pts = models.rank_points(model)
    assert list(got.scores) == list(pts)
    for conv, s in got.scores.items():
        assert len(s) == model.get_submodule(conv).out_channels
        assert np.all((s >= 0) & (s <= min(got.spatial[conv])))
    if arch == "googlenet":
        np.testing.assert_array_equal(got.scores["inception_a3.branch5x5.3"], got.scores["inception_a3.branch5x5.6"])
        assert got.spatial["inception_b3.branch1x1.0"] == (16, 16)  # after maxpool1


def test_bad_input_one_line_errors():
    model = make_model()
    with pytest.raises(HRankError, match="num_images must be >= 1"):
        compute_ranks(model, images(4), num_images=0, progress=False)
    with pytest.raises(HRankError, match="empty"):
        compute_ranks(model, images(0), num_images=1, progress=False)
    with pytest.raises(HRankError, match="has 4 images, fewer than num_images=5"):
        compute_ranks(model, images(4), num_images=5, progress=False)
    with pytest.raises(HRankError, match="1 channels"):
        compute_ranks(model, images(4, channels=1), num_images=2, progress=False)
    with pytest.raises(HRankError, match="expects 3x32x32"):
        compute_ranks(model, images(4, size=28), num_images=2, progress=False)
    with pytest.raises(HRankError, match="float image tensors"):
        compute_ranks(model, [torch.zeros(2, 3, 32, 32, dtype=torch.uint8)], num_images=2, progress=False)
    with pytest.raises(HRankError, match="yielded 2 images, fewer than the 5"):
        compute_ranks(model, [torch.zeros(2, 3, 32, 32)], num_images=5, progress=False)
    fixed = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 2))
    with pytest.raises(HRankError, match=r"failed on images of shape \(2, 3, 6, 6\) \(RuntimeError: mat1 and mat2"):
        compute_ranks(fixed, [torch.zeros(2, 3, 6, 6)], num_images=2, points={"0": "1"}, progress=False)


# --------------------------------------------------------------------------------------------------
# 4. the Ranks file, validation, official import
# --------------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_validate(tmp_path):
    model = make_model()
    ranks = compute_ranks(model, images(8), num_images=8, batch_size=8, progress=False)
    path = tmp_path / "r.npz"
    ranks.save(path)
    back = Ranks.load(path, model)
    assert list(back.scores) == list(ranks.scores)
    for c in ranks.scores:
        np.testing.assert_array_equal(back.scores[c], ranks.scores[c])
    assert back.points == ranks.points and back.spatial == ranks.spatial and back.meta == ranks.meta
    assert (back.num_images, back.fingerprint, back.arch) == (8, ranks.fingerprint, "resnet_20")
    with np.load(path, allow_pickle=False) as z:  # plain arrays and a JSON header, no pickles
        assert json.loads(bytes(z["header"]).decode())["format"] == "hrank-ranks"
    with pytest.raises(HRankError, match="for resnet_20, not for the resnet_32"):
        Ranks.load(path, models.create("resnet_32"))
    other = models.create("resnet_32")
    del other.hrank_arch
    with pytest.raises(HRankError, match="the ranked model had no conv layer1.3.conv1"):
        back.validate(other)
    narrow = models.create("resnet_20")
    narrow.layer1[0].conv1 = nn.Conv2d(16, 12, 3, padding=1, bias=False)
    with pytest.raises(HRankError, match="layer1.0.conv1 has 12 filters, the ranks 16"):
        back.validate(narrow)
    with pytest.raises(HRankError, match="conv1 has 8 filters, the ranks 16"):
        back.validate(TVResNet())
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(HRankError, match="not an hrank ranks file"):
        Ranks.load(tmp_path / "bad.npz")
    with pytest.raises(HRankError, match="not found"):
        Ranks.load(tmp_path / "missing.npz")


def test_fingerprint_is_about_shapes_not_values():
    a, b = models.create("resnet_20"), models.create("resnet_20")
    assert model_fingerprint(a) == model_fingerprint(b)
    assert model_fingerprint(a) != model_fingerprint(models.create("resnet_32"))
    assert model_fingerprint(a) != model_fingerprint(models.create("resnet_20", num_classes=100))


@pytest.mark.parametrize("arch", OFFICIAL_ARCHS)
def test_official_import_matches_official_selection(arch, reference_dir, tmp_path):
    folder = reference_dir / "official_ranks" / arch
    ranks = Ranks.from_official(folder, arch)
    selection = json.loads((reference_dir / "official_selection.json").read_text())[arch]
    entries = next(iter(selection["strings"].values()))["convs"]
    assert len(ranks.scores) == len(entries) == {"vgg_16_bn": 12, "resnet_56": 55, "resnet_110": 109,
                                                 "densenet_40": 39, "googlenet": 46, "resnet_50": 53}[arch]
    for e in entries:
        np.testing.assert_array_equal(ranks.scores[e["module"]], np.load(folder / e["rank_file"]).astype(np.float64))
        assert len(ranks.scores[e["module"]]) == e["C"]
    assert ranks.meta["source"] == "official" and ranks.num_images == 768 and ranks.arch == arch
    with torch.device("meta"):
        model = models.create(arch)
    ranks.validate(model)
    assert ranks.fingerprint == model_fingerprint(model)
    if arch == "resnet_56":
        assert ranks.spatial["conv1"] == (32, 32) and ranks.spatial["layer3.8.conv2"] == (8, 8)
        ranks.save(tmp_path / "o.npz")
        assert Ranks.load(tmp_path / "o.npz", model).meta["source"] == "official"


def test_official_import_errors(reference_dir, tmp_path):
    with pytest.raises(HRankError, match="lacks rank_conv1.npy"):
        Ranks.from_official(tmp_path, "resnet_56")
    with pytest.raises(HRankError, match="rank_conv20.npy has \\(32,\\) values, layer1.9.conv1 of resnet_110"):
        Ranks.from_official(reference_dir / "official_ranks" / "resnet_56", "resnet_110")
    with pytest.raises(HRankError, match="no official HRank ranks"):
        Ranks.from_official(tmp_path, "resnet_20")
    with pytest.raises(HRankError, match="not found"):
        Ranks.from_official(tmp_path / "nope", "resnet_56")


# --------------------------------------------------------------------------------------------------
# 5. the command line
# --------------------------------------------------------------------------------------------------

def test_cli_rank_end_to_end(tiny_cifar, tmp_path, capsys):
    ckpt = tmp_path / "r20.pt"
    torch.save({"state_dict": make_model().state_dict()}, ckpt)
    out = tmp_path / "ranks.npz"
    args = ["rank", "--model", "resnet_20", "--checkpoint", str(ckpt), "--dataset", "cifar10", "--data-dir",
            str(tiny_cifar), "--no-download", "--num-images", "16", "--batch-size", "8", "--device", "cpu",
            "--out", str(out)]  # on the device the direct computation below runs on: the same float32 maps
    assert cli_main(args) == 0
    text = capsys.readouterr().out
    assert "layer3.2.conv2" in text and "rank 0" in text and str(out) in text
    ranks = Ranks.load(out, models.create("resnet_20"))
    assert ranks.num_images == 16 and len(ranks.scores) == 19
    data = load_cifar(tiny_cifar, download=False)
    direct = compute_ranks(make_model(), data, num_images=16, batch_size=8, progress=False)
    for c in direct.scores:
        np.testing.assert_array_equal(ranks.scores[c], direct.scores[c])
    assert cli_main(args) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert cli_main(args + ["--force", "--no-augment", "--seed", "3", "--normalization", "imagenet"]) == 0
    assert Ranks.load(out).meta["normalization"]["name"] == "imagenet"
    capsys.readouterr()
    assert cli_main(args[:-2] + ["--out", str(tmp_path / "x.npz"), "--num-images", "999"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than num_images=999" in err[0]


def test_cli_rank_official_and_errors(reference_dir, tmp_path, capsys):
    out = tmp_path / "official.npz"
    assert cli_main(["rank", "--model", "resnet_56", "--official", str(reference_dir / "official_ranks" /
                                                                      "resnet_56"), "--out", str(out)]) == 0
    assert Ranks.load(out).meta["source"] == "official"
    capsys.readouterr()
    assert cli_main(["rank", "--model", "resnet_20", "--checkpoint", str(tmp_path / "none.pt"), "--out",
                     str(tmp_path / "y.npz")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "checkpoint not found" in err[0]
    assert not (tmp_path / "y.npz").exists()


def test_warnings_do_not_leak_from_registry_models():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_ranks(make_model(), images(4), num_images=4, progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_ranks_match_cpu_ranks_and_tf32_is_restored(tiny_cifar):
    """On CUDA the maps are computed in full float32 (no TF32), so the scores are the CPU's up to the rare map
    whose rank flips under a different summation order."""
    torch.backends.cudnn.allow_tf32 = True
    data = load_cifar(tiny_cifar, download=False)
    cpu = compute_ranks(make_model(), data, num_images=32, batch_size=16, progress=False, device="cpu")
    gpu = compute_ranks(make_model(), data, num_images=32, batch_size=16, progress=False, device="cuda")
    assert torch.backends.cudnn.allow_tf32  # restored
    flat_cpu = np.concatenate([cpu.scores[c] for c in cpu.scores])
    flat_gpu = np.concatenate([gpu.scores[c] for c in cpu.scores])
    assert np.abs(flat_cpu - flat_gpu).max() <= 1 / 32 + 1e-12  # at most one map of one image differs by 1
    assert (flat_cpu == flat_gpu).mean() >= 0.99
