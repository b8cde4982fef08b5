"""Pruning CNNs hrank was never tuned on: grouped convs, channel shuffles, LayerNorm streams, layer scales,
transposed convs, partial specs and ignore patterns; the physical == mask invariant and all-or-nothing apply."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hrank.prune as prune_module
from hrank import flops, models
from hrank.errors import HRankError
from hrank.layers import is_conv
from hrank.plan import find_groups, make_plan
from hrank.prune import apply_plan
from hrank.spec import Spec


def _scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}


def _prune_both(model: nn.Module, spec, x: torch.Tensor, **kw):
    plan = make_plan(model, _scores(model), spec, example_input=x, **kw)
    physical = apply_plan(copy.deepcopy(model), plan, example_input=x)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask", example_input=x)
    return plan, physical.eval(), masked.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm()) if a.requires_grad is False else _rel(a.detach(), b.detach())


class GroupedBlock(nn.Module):
    """1x1 conv -> ReLU -> kxk conv (groups=4) -> BN -> ReLU -> 1x1 conv: the ResNeXt/RegNet pattern."""

    def __init__(self, kernel: tuple[int, int] = (3, 3)) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.b = nn.Conv2d(16, 16, kernel, padding=(kernel[0] // 2, kernel[1] // 2), groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.c(torch.relu(self.bn(self.b(torch.relu(self.a(x))))))
        return self.fc(y.mean((2, 3)))


@pytest.mark.parametrize("spec", [{"b": 0.5}, {"a": 0.5}, {"*": 0.3}])
def test_grouped_conv_pruned_block_wise(spec):
    torch.manual_seed(0)
    model = GroupedBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = {g.members[0]: g for g in find_groups(model, x)}
    assert groups["a"].blocks == 4 and groups["b"].blocks == 4 and groups["c"].blocks == 1
    plan, physical, masked = _prune_both(model, spec, x)
    for g in plan.pruned_groups():
        if g.members[0] in ("a", "b"):
            counts = g.block_counts()
            assert g.blocks == 4 and len(set(counts)) == 1 and sum(counts) == g.width
    assert physical.b.groups == 4 and physical.b.weight.shape[1] * 4 == physical.b.in_channels
    assert _rel(physical(x), masked(x)) < 1e-5
    assert flops.count(physical, (3, 8, 8)).macs < flops.count(model, (3, 8, 8)).macs


def test_grouped_selection_compares_scores_within_each_block():
    model = GroupedBlock().eval()
    x = torch.randn(1, 3, 8, 8)
    scores = _scores(model)
    scores["a"] = np.array([0, 1, 2, 3] * 4, dtype=float)  # every block: its first two channels are the lowest
    scores["a"][4:8] += 100  # block 1 scores far higher than the others: a global sort would keep it whole
    plan = make_plan(model, scores, {"a": 0.5}, example_input=x)
    assert plan.layers["a"] == [2, 3, 6, 7, 10, 11, 14, 15]


def test_a_wrong_physical_prune_is_an_error_and_the_model_is_untouched(monkeypatch):
    """Torch-Pruning 1.6.1's own grouped-input slicing (the same columns in every row) computes another
    network; the invariant must catch it, name the group, and leave the caller's model as it was."""

    def naive(weight, groups, drop, drop_out=()):  # keep_idxs[:len // groups] as Torch-Pruning does
        per = weight.shape[1]
        kept = [i for i in range(per * groups) if i not in set(drop)]
        return weight.detach()[:, kept[: len(kept) // groups]]

    monkeypatch.setattr(prune_module, "_grouped_in_weight", naive)
    model = GroupedBlock().eval()
    x = torch.randn(1, 3, 8, 8)
    scores = _scores(model)
    scores["a"] = np.array([0, 1, 5, 6, 5, 6, 0, 1] * 2, dtype=float)  # different positions pruned per block
    plan = make_plan(model, scores, {"a": 0.5}, example_input=x)
    params = {n: p for n, p in model.named_parameters()}
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(HRankError, match="does not compute what the masked one does.*first group that breaks it: a"):
        apply_plan(model, plan, example_input=x)
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.b.in_channels == 16 and model.a.out_channels == 16 and getattr(model, "hrank_plan", None) is None


def test_failed_apply_restores_every_module_attribute():
    model = models.create("resnet_20").eval()
    scores = _scores(model)
    plan = make_plan(model, scores, "[0.5]*19")
    plan.groups[3].kept = plan.groups[3].kept[:-1] + [plan.groups[3].channels + 5]  # corrupt after validation
    snapshot = {n: (type(m), dict(vars(m)).keys(), getattr(m, "out_channels", None)) for n, m in model.named_modules()}
    weights = copy.deepcopy(model.state_dict())
    with pytest.raises(HRankError, match="forward check"):
        apply_plan(model, plan)
    assert {n: (type(m), dict(vars(m)).keys(), getattr(m, "out_channels", None))
            for n, m in model.named_modules()} == snapshot
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_cifar_resnet_streams_physical_equals_mask():
    """Option-A shortcuts copy channels into pruned stream positions; the masks must cut them as the
    physical shortcut map does."""
    torch.manual_seed(0)
    model = models.create("resnet_20").eval()
    x = torch.randn(2, 3, 32, 32)
    _, physical, masked = _prune_both(model, "[0.5]*19", x)
    assert _rel(physical(x), masked(x)) < 1e-5


class Shuffle(nn.Module):
    """Two branches concatenated and channel-shuffled (ShuffleNetV2's block), then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.left = nn.Conv2d(8, 8, 1)
        self.inner = nn.Conv2d(8, 8, 3, padding=1)
        self.right = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(16, 12, 1)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(torch.relu(self.inner(x))))], 1)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


def test_channel_shuffle_is_reported_not_crashed():
    torch.manual_seed(0)
    model = Shuffle().eval()
    x = torch.randn(2, 3, 8, 8)
    groups = {g.members[0]: g for g in find_groups(model, x)}
    assert not groups["left"].prunable and "reshape" in groups["left"].reason
    assert not groups["right"].prunable and groups["inner"].prunable and groups["head"].prunable
    plan, physical, masked = _prune_both(model, {"*": 0.5}, x)
    assert {s["conv"] for s in plan.skipped} == {"left", "right"}
    assert physical.inner.out_channels == 4 and physical.head.out_channels == 6
    assert _rel(physical(x), masked(x)) < 1e-5
    with pytest.raises(HRankError, match="cannot prune .*left.*reshape"):
        make_plan(model, _scores(model), {"left": 0.5}, example_input=x)


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """A ConvNeXt block: stream normalized by LayerNorm over channels, an MLP on NHWC, a layer scale."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.stem_norm = LayerNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.norm = nn.LayerNorm(16)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.scale = nn.Parameter(torch.rand(16, 1, 1) + 0.5)
        self.out = nn.Conv2d(16, 10, 1)

    def forward(self, x):
        x = self.stem_norm(self.stem(x))
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)
        x = x + self.scale * y
        return self.out(x).mean((2, 3))


def test_layernorm_stream_and_layer_scale_physical_equals_mask():
    torch.manual_seed(0)
    model = ConvNeXtish().eval()
    with torch.no_grad():
        for p in (model.stem_norm.weight, model.norm.weight):
            p.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 16, 16)
    plan, physical, masked = _prune_both(model, {"stem": 0.5}, x)
    assert physical.stem.out_channels == 8 and physical.scale.shape == (8, 1, 1) and physical.norm.weight.shape == (8,)
    assert _rel(physical(x), masked(x)) < 1e-5
    assert float(masked.scale.detach()[[c for c in range(16) if c not in plan.layers["stem"]]].abs().sum()) == 0


class UNetish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.out = nn.Conv2d(12 + 3, 2, 1)

    def forward(self, x):
        y = torch.relu(self.up(torch.relu(self.down(x))))
        return self.out(torch.cat([y, x], 1))


def test_conv_transpose_pruned_on_both_sides_and_counted():
    torch.manual_seed(0)
    model = UNetish().eval()
    x = torch.randn(2, 3, 16, 16)
    plan, physical, masked = _prune_both(model, {"down": 0.5, "up": 0.5}, x)
    assert physical.down.out_channels == 8 and physical.up.in_channels == 8 and physical.up.out_channels == 6
    assert physical.out.in_channels == 9
    assert _rel(physical(x), masked(x)) < 1e-5
    before, after = flops.count(model, (3, 16, 16)), flops.count(physical, (3, 16, 16))
    up_before = next(layer for layer in before.layers if layer.name == "up").macs
    up_after = next(layer for layer in after.layers if layer.name == "up").macs
    assert up_before == 16 * 12 * 4 * 8 * 8 and up_after == 8 * 6 * 4 * 8 * 8


def test_partial_spec_skips_and_reports_exact_names_fail():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.zeros(1, 3, 12, 12)
    scores = _scores(net)
    plan = make_plan(net, scores, Spec.from_mapping(net, {"*": 0.5}), example_input=x)
    assert plan.skipped == [{"conv": "4", "reason": "its channels are an output of the network"}]
    assert plan.layers["0"] != list(range(8)) and len(plan.layers["2"]) == 4
    assert "1 rated conv(s) skipped" in plan.summary() and plan.skipped_lines() == [
        "4: its channels are an output of the network"]
    with pytest.raises(HRankError, match="cannot prune group 4: its channels are an output"):
        make_plan(net, scores, Spec.from_mapping(net, {"*": 0.5, "4": 0.5}), example_input=x)
    del scores["2"]  # no rank point: skipped when reached by a pattern, an error when named
    plan = make_plan(net, scores, Spec.from_mapping(net, {"*": 0.5}), example_input=x)
    assert {s["conv"]: s["reason"] for s in plan.skipped}["2"].startswith("no scores")
    with pytest.raises(HRankError, match="no scores"):
        make_plan(net, scores, {"2": 0.5}, example_input=x)


def test_ignore_patterns_leave_groups_whole():
    model = models.create("resnet_20")
    spec = Spec.from_mapping(model, {"*": 0.5}, ignore=["layer1.*", "conv1"])
    assert not any(c.startswith("layer1.") for c in spec.rates) and "conv1" not in spec.rates
    plan = make_plan(model, _scores(model), spec)
    # the stem stream couples conv1 with layer1.*.conv2: ignored, so whole; layer2's inner convs are pruned
    assert plan.layers.get("layer1.0.conv2", list(range(16))) == list(range(16))
    assert len(plan.layers["layer2.0.conv1"]) == 16
    assert Spec.from_json(spec.to_json(), model).ignored == spec.ignored
    with pytest.raises(HRankError, match="ignore pattern 'nothing.*' matches no conv"):
        Spec.from_mapping(model, {"*": 0.5}, ignore=["nothing.*"])
    coupled = Spec.from_mapping(model, {"layer1.0.conv2": 0.5}, ignore=["layer1.1.conv2"])
    with pytest.raises(HRankError, match="coupled with ignored layer1.1.conv2"):
        make_plan(model, _scores(model), coupled)


class ResNeXtish(nn.Module):
    """Two bottlenecks with grouped 3x3 convs and residual adds (ResNeXt), then a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            self.blocks.append(nn.Sequential(nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32), nn.ReLU(),
                                             nn.Conv2d(32, 32, 3, padding=1, groups=8), nn.BatchNorm2d(32), nn.ReLU(),
                                             nn.Conv2d(32, 32, 1), nn.BatchNorm2d(32)))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("round_to", [1, 8])
def test_budget_on_grouped_convs_hits_the_real_network(round_to):
    from hrank.budget import find_budget

    torch.manual_seed(0)
    model = ResNeXtish().eval()
    x = torch.randn(1, 3, 16, 16)
    result = find_budget(model, _scores(model), target=0.6, example_input=x, round_to=round_to)
    plan = make_plan(model, _scores(model), result.spec, example_input=x)
    pruned = apply_plan(copy.deepcopy(model), plan, example_input=x)
    real = flops.count(pruned, (3, 16, 16)).macs
    assert real == result.macs and abs(real / flops.count(model, (3, 16, 16)).macs - 0.6) < 0.05
    assert all(len(set(g.block_counts())) == 1 for g in plan.groups if g.blocks > 1)
    assert any(g.blocks == 8 and g.width < g.channels for g in plan.groups)


def test_budget_ignore_leaves_groups_whole():
    from hrank.budget import find_budget

    model = ResNeXtish().eval()
    x = torch.randn(1, 3, 16, 16)
    result = find_budget(model, _scores(model), target=0.7, example_input=x, round_to=1, ignore=["blocks.0.[03]"])
    assert "blocks.0.0" not in result.spec.rates and "blocks.0.3" not in result.spec.rates
    plan = make_plan(model, _scores(model), result.spec, example_input=x)
    assert all(len(plan.layers.get(f"blocks.0.{i}", [0] * 32)) == 32 for i in (0, 3))
    assert len(plan.layers["stem"]) < 32


def test_conv_transpose_is_ranked_and_pruned_from_ranks():
    from hrank.ranks import compute_ranks

    torch.manual_seed(0)
    model = UNetish().eval()
    x = torch.randn(8, 3, 16, 16)
    ranks = compute_ranks(model, x, num_images=8, batch_size=4, progress=False)
    assert set(ranks.scores) == {"down", "up", "out"} and ranks.points["up"].module == "up"
    plan = make_plan(model, ranks, Spec.from_mapping(model, {"*": 0.5}), example_input=x[:1])
    assert len(plan.layers["up"]) == 6 and [s["conv"] for s in plan.skipped] == ["out"]
    physical = apply_plan(copy.deepcopy(model), plan, example_input=x[:1])
    assert physical.up.out_channels == 6 and physical(x).shape == model(x).shape


class _Positional(nn.Module):
    """A conv whose channels `forward` cuts by position: a slice, a split, a chunk, or a slice of all of them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        widths = {"slice": (7, 8), "split": (1, 7), "chunk": (4, 4), "full": (8, 8)}[how]
        self.b = nn.Conv2d(widths[0], 4, 3, padding=1)
        self.c = nn.Conv2d(widths[1], 4, 1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if self.how == "slice":
            p, q = y[:, 1:], y
        elif self.how == "split":
            p, q = torch.split(y, [1, 7], 1)
        elif self.how == "chunk":
            p, q = torch.chunk(y, 2, 1)
        else:
            p, q = y[:, :8], y[:, 0:]
        return self.fc(torch.cat([torch.relu(self.b(p)), torch.relu(self.c(q))], 1).mean((2, 3)))


@pytest.mark.parametrize("how", ["slice", "split", "chunk"])
def test_channels_cut_by_position_are_not_pruned_and_the_rest_is(how):
    # the sizes and bounds are literals in forward: pruning them would cut the pruned tensor in the wrong place
    torch.manual_seed(0)
    net = _Positional(how).eval()
    x = torch.randn(2, 3, 16, 16)
    groups = {g.members[0]: g for g in find_groups(net, x)}
    assert not groups["a"].prunable and "split or sliced by position" in groups["a"].reason
    assert groups["b"].prunable and groups["c"].prunable
    spec = Spec.from_mapping(net, {"*": 0.5})
    plan = make_plan(net, {n: np.arange(m.out_channels, dtype=float) for n, m in net.named_modules()
                           if isinstance(m, nn.Conv2d)}, spec, example_input=x)
    assert [s["conv"] for s in plan.skipped] == ["a"]
    pruned = apply_plan(copy.deepcopy(net), plan, example_input=x)  # the invariant is checked inside
    assert (pruned.a.out_channels, pruned.b.out_channels, pruned.c.out_channels) == (8, 2, 2)
    # asking for the cut conv alone is one clear line, not a Torch-Pruning IndexError
    with pytest.raises(HRankError, match="split or sliced by position"):
        make_plan(net, {"a": np.arange(8.0)}, Spec.from_mapping(net, {"a": 0.5}), example_input=x)


def test_a_slice_that_keeps_every_channel_does_not_block_pruning():
    torch.manual_seed(0)
    net = _Positional("full").eval()
    x = torch.randn(2, 3, 16, 16)
    groups = {g.members[0]: g for g in find_groups(net, x)}
    assert groups["a"].prunable
    scores = {n: np.arange(m.out_channels, dtype=float) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    pruned = apply_plan(copy.deepcopy(net), make_plan(net, scores, Spec.from_mapping(net, {"a": 0.5}),
                                                      example_input=x), example_input=x)
    assert pruned.a.out_channels == pruned.b.in_channels == pruned.c.in_channels == 4


class _Blur(nn.Module):
    """An anti-aliasing blur as timm's BlurPool2d writes it: a depthwise F.conv2d with a filter buffer, sized
    for a set channel count (``channels``) or expanded to the input's (``None``)."""

    def __init__(self, channels: int | None) -> None:
        super().__init__()
        self.channels = channels
        filt = torch.tensor([1.0, 2.0, 1.0])
        filt = (filt[:, None] * filt[None, :] / 16)[None, None]
        self.register_buffer("filt", filt.repeat(channels or 1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, [1, 1, 1, 1], mode="reflect")
        channels = self.channels or x.shape[1]
        weight = self.filt if self.channels else self.filt.expand(channels, 1, 3, 3)
        return F.conv2d(x, weight, stride=2, groups=channels)


class _FrozenBN(nn.Module):
    """BatchNorm with its affine and statistics as buffers (torchvision's FrozenBatchNorm2d)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name in ("weight", "bias", "running_mean", "running_var"):
            self.register_buffer(name, torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(1, -1, 1, 1)


class _BufferNet(nn.Module):
    """a -> blur -> b -> frozen BN -> c: the buffers of the middle module decide which groups can shrink."""

    def __init__(self, blur_channels: int | None) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.blur = _Blur(blur_channels)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.frozen = _FrozenBN(8)
        self.c = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.blur(torch.relu(self.a(x)))
        y = torch.relu(self.frozen(self.b(y)))
        return self.fc(torch.relu(self.c(y)).mean((2, 3)))


@pytest.mark.parametrize("blur_channels", [8, None])
def test_channels_that_meet_a_fixed_per_channel_buffer_are_not_pruned_and_frozen_bns_are(blur_channels):
    # Torch-Pruning shrinks layers and parameters, never buffers: a blur filter sized for 8 channels would no
    # longer fit (before: the whole prune failed its forward check). A filter expanded to the input's channels
    # fits any width, so that group is pruned; a frozen BN's four buffers are sliced by hrank's pruner.
    torch.manual_seed(0)
    net = _BufferNet(blur_channels).eval()
    x = torch.randn(2, 3, 16, 16)
    groups = {g.members[0]: g for g in find_groups(net, x)}
    assert groups["b"].prunable and groups["c"].prunable
    assert groups["a"].prunable == (blur_channels is None)
    if blur_channels:
        assert "buffer filt of blur (_Blur)" in groups["a"].reason
    scores = {n: np.arange(m.out_channels, dtype=float) for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    plan = make_plan(net, scores, Spec.from_mapping(net, {"*": 0.5}), example_input=x)
    assert [s["conv"] for s in plan.skipped] == (["a"] if blur_channels else [])
    for mode in ("physical", "mask"):  # physical == mask is checked inside the physical apply
        pruned = apply_plan(copy.deepcopy(net), plan, mode=mode, example_input=x)
        assert pruned(x).shape == (2, 3)
    assert pruned.b.out_channels == 8  # mask mode keeps the widths
    pruned = apply_plan(copy.deepcopy(net), plan, example_input=x)
    assert pruned.a.out_channels == (8 if blur_channels else 4) and pruned.b.out_channels == 4
    kept = torch.tensor([g.kept for g in plan.groups if g.members[0] == "b"][0])
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(pruned.frozen, name), getattr(net.frozen, name)[kept])


class _GainConv(nn.Conv2d):
    """A conv subclass with a learned per-filter ``gain`` (a parameter of the conv besides weight and bias, as
    NF-ResNet's ScaledStdConv2d has) and a per-filter ``scale`` buffer."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)
        self.register_buffer("scale", torch.rand(self.out_channels) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(x, self.weight * self.gain, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return y * self.scale.reshape(1, -1, 1, 1)


class _NFish(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = _GainConv(3, 16, 3, padding=1)
        self.dw = _GainConv(16, 16, 3, padding=1, groups=16)
        self.b = _GainConv(16, 8, 1, bias=False)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.dw(torch.relu(self.a(x))))
        return self.fc(torch.relu(self.b(y)).mean((2, 3)))


def test_a_conv_subclass_keeps_the_gain_of_each_kept_filter():
    # Torch-Pruning slices a conv's weight and bias only; the pruned a had 8 filters and 16 gains, and the whole
    # prune failed its forward check. The gains and scales of the kept filters must travel with them.
    from hrank.budget import find_budget

    torch.manual_seed(0)
    model = _NFish().eval()
    x = torch.randn(2, 3, 12, 12)
    scores = {n: np.arange(m.out_channels, dtype=float) for n, m in model.named_modules() if is_conv(m)}
    plan = make_plan(model, scores, Spec.from_mapping(model, {"*": 0.5}), example_input=x)
    pruned = apply_plan(copy.deepcopy(model), plan, example_input=x)  # physical == mask is checked inside
    kept = {g.members[0]: g.kept for g in plan.groups}
    assert pruned.a.out_channels == pruned.dw.out_channels == 8 and pruned.b.out_channels == 4
    assert torch.equal(pruned.a.gain, model.a.gain[kept["a"]])
    assert torch.equal(pruned.dw.scale, model.dw.scale[kept["a"]])
    assert torch.equal(pruned.b.gain, model.b.gain[kept["b"]])
    # the budget counts the gains: its params are the pruned network's, exactly
    result = find_budget(model, scores, target=0.6, metric="params", example_input=x, round_to=1, tolerance=0.1)
    real = apply_plan(copy.deepcopy(model), make_plan(model, scores, result.spec, example_input=x), example_input=x)
    assert result.params == sum(p.numel() for p in real.parameters())


class _GlobalContext(nn.Module):
    """GCNet's context block: a spatial softmax over a 1x1 conv pools the map into one context vector per image,
    which a 1x1 conv adds back. Torch-Pruning maps its reshapes as flattens over and over (a walk of 16 channel
    indices grew by 256x per step: 13 s for this toy, hours for timm's gcresnet33ts)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.attn = nn.Conv2d(c, 1, 1)
        self.mlp = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        a = self.attn(x).reshape(b, 1, h * w).softmax(-1).unsqueeze(-1)
        ctx = (x.reshape(b, c, h * w).unsqueeze(1) @ a).reshape(b, c, 1, 1)
        return x + self.mlp(ctx)


class _GCNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gc = _GlobalContext(16)
        self.b = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.b(self.gc(torch.relu(self.a(x)))))
        return self.fc(y.flatten(1))


def test_a_runaway_index_mapping_stops_at_the_largest_activation_and_a_real_flatten_does_not():
    from hrank.plan import build_dependency_graph

    torch.manual_seed(0)
    net = _GCNet().eval()
    x = torch.randn(1, 3, 16, 16)
    graph = build_dependency_graph(net, x)
    assert graph.hrank_max_indices == 16 * 16 * 16  # the largest activation of one image: a's output
    groups = {g.members[0]: g for g in find_groups(net, x, graph=graph)}
    attn = groups["gc.attn"]
    assert not attn.prunable and "index mapping grew past 4,096 channel indices" in attn.reason
    # b's channels reach the classifier through a real flatten (8 x 8 x 8 = 512 indices): mapped, and pruned
    assert groups["b"].prunable
    plan = make_plan(net, {"b": np.arange(8.0)}, Spec.from_mapping(net, {"b": 0.5}), example_input=x)
    pruned = apply_plan(copy.deepcopy(net), plan, example_input=x)
    assert pruned.b.out_channels == 4 and pruned.fc.in_features == 4 * 8 * 8


class _FunctionalConv(nn.Module):
    """A conv written as ``F.conv2d(x, self.weight)`` in a plain module: Torch-Pruning sees an element-wise op
    and a loose (8, 8, 3, 3) parameter it would cut along its last dimension (an IndexError used to escape)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8, 3, 3) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, padding=1)


class _Sandwich(nn.Module):
    """a -> ReLU -> ``middle`` -> ReLU -> b -> pooled linear: what ``middle`` is decides whether a can shrink."""

    def __init__(self, middle: nn.Module) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)
        self.middle = middle
        self.b = nn.Conv2d(8, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.b(torch.relu(self.middle(torch.relu(self.a(x)))))).mean((2, 3)))


@pytest.mark.parametrize("middle, reason", [
    # the trace hooks every module to know which one issues each op; TorchScript modules take no hooks
    ("scripted relu", None),
    # Torch-Pruning takes a scripted conv for an element-wise op and its weight for loose parameters
    ("scripted conv", "TorchScript module middle"),
    ("functional conv", "parameter weight of middle (_FunctionalConv) of a functional conv2d"),
])
def test_what_sits_between_two_convs_decides_whether_the_first_is_pruned(middle, reason):
    torch.manual_seed(0)
    module = {"scripted relu": lambda: torch.jit.script(nn.ReLU()),
              "scripted conv": lambda: torch.jit.script(nn.Conv2d(8, 8, 3, padding=1)),
              "functional conv": _FunctionalConv}[middle]()
    net = _Sandwich(module).eval()
    x = torch.randn(1, 3, 16, 16)
    groups = {g.members[0]: g for g in find_groups(net, x)}
    assert groups["a"].prunable == (reason is None) and groups["b"].prunable
    if reason:
        assert reason in groups["a"].reason
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"*": 0.5}), example_input=x)
    assert [s["conv"] for s in plan.skipped] == ([] if reason is None else ["a"])
    pruned = apply_plan(copy.deepcopy(net), plan, example_input=x)  # physical == mask is checked inside
    assert (pruned.a.out_channels, pruned.b.out_channels) == (8 if reason else 4, 2)


class _Tied(nn.Module):
    """A layer whose output takes its channel count from its input's shape (timm's lambda layer does this):
    a coupling of two groups that no trace sees."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.conv(x).reshape(b, c, h, w)


def test_a_pruned_model_that_cannot_run_names_the_group_that_breaks_it():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.tied = _Tied()
            self.b = nn.Conv2d(8, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.relu(self.b(torch.relu(self.tied(torch.relu(self.a(x))))))
            return self.fc(y.mean((2, 3)))

    torch.manual_seed(0)
    net = Net().eval()
    x = torch.randn(1, 3, 8, 8)
    before = copy.deepcopy(net.state_dict())
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"a": 0.5, "b": 0.5}), example_input=x)
    with pytest.raises(HRankError, match=r"fails its forward check .*the first group that breaks it: a \(ignore"):
        apply_plan(net, plan, example_input=x)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())  # all or nothing
    # ignoring that group, the rest prunes
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"b": 0.5}), example_input=x)
    assert apply_plan(net, plan, example_input=x).b.out_channels == 2
