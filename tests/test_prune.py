"""Applying plans: zero filters pruned away leave outputs unchanged, mask == physical, models outside the
registry, HRank's masks reproduced, BN recalibration, save/load without pickled modules, TP guards."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn

import hrank
from hrank import flops, models
from hrank.checkpoint import build_from_record, load, model_record, save
from hrank.errors import HRankError
from hrank.plan import Plan, find_groups, make_plan
from hrank.prune import apply_plan, enforce_masks, recalibrate_bn

# --------------------------------------------------------------------------------------------------------
# Models outside the registry
# --------------------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: 3x3-BN-ReLU-3x3-BN, 1x1-conv+BN downsample when the shape changes."""

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
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision-style ResNet-18 (7x7 stem, max-pool, [2, 2, 2, 2] BasicBlocks, adaptive pool, fc)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout)))
            cin = cout
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _cbr(cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1, act: bool = True) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU6(inplace=True)] if act else layers


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (t > 1), 3x3 depthwise, 1x1 linear projection; residual when shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, t: int) -> None:
        super().__init__()
        hidden = cin * t
        layers = _cbr(cin, hidden) if t != 1 else []
        layers += _cbr(hidden, hidden, 3, stride, groups=hidden) + _cbr(hidden, cout, act=False)
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    """A small MobileNetV2 (same structure, fewer blocks): stem, inverted residuals, 1x1 head conv, linear."""

    CFG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2)]  # t, c, n, s

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(*_cbr(3, 32, 3))]
        cin = 32
        for t, c, n, s in self.CFG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(nn.Sequential(*_cbr(cin, 128)))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(nn.functional.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------

X32 = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN parameters and statistics, so that a wrongly sliced BN changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.2 * torch.randn(n, generator=g))
                m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def conv_bn_pairs(model: nn.Module) -> dict[str, nn.Module]:
    """Each conv's BatchNorm: the next BN registered after it, before any other conv."""
    mods = list(model.named_modules())
    pairs = {}
    for i, (name, m) in enumerate(mods):
        if not isinstance(m, nn.Conv2d):
            continue
        for _, m2 in mods[i + 1:]:
            if isinstance(m2, nn.Conv2d):
                break
            if isinstance(m2, nn.BatchNorm2d) and m2.num_features == m.out_channels:
                pairs[name] = m2
                break
    return pairs


def densenet_consumer_bns(model: nn.Module) -> dict[str, list[tuple[nn.Module, int]]]:
    """DenseNet-40: for each conv, every (BN, offset) that reads its channels through the concatenations."""
    out: dict[str, list[tuple[nn.Module, int]]] = {}
    source, width = "conv1", 24
    for b in (1, 2, 3):
        block = getattr(model, f"dense{b}")
        tail = model.trans1.bn1 if b == 1 else model.trans2.bn1 if b == 2 else model.bn
        readers = [layer.bn1 for layer in block] + [tail]
        out[source] = [(bn, 0) for bn in readers]
        for k in range(len(block)):
            out[f"dense{b}.{k}.conv1"] = [(bn, width + 12 * k) for bn in readers[k + 1:]]
        width += 12 * len(block)
        source = f"trans{b}.conv1"
    return out


def zero_filters(model: nn.Module, conv: str, channels: list[int], pairs: dict, dense: dict | None) -> None:
    """Make ``conv``'s channels exactly 0 after its BN (weights, bias, gamma and beta zeroed)."""
    m = model.get_submodule(conv)
    with torch.no_grad():
        m.weight[channels] = 0
        if m.bias is not None:
            m.bias[channels] = 0
        targets = dense[conv] if dense is not None else [(pairs[conv], 0)]
        for bn, offset in targets:
            idx = [offset + c for c in channels]
            bn.weight[idx] = 0
            bn.bias[idx] = 0


def zeroed_plan(model: nn.Module, x: torch.Tensor, choose) -> tuple[Plan, dict[str, list[int]]]:
    """Zero ``choose(group)`` channels in every member of every group; a plan that prunes exactly those."""
    dense = densenet_consumer_bns(model) if getattr(model, "hrank_arch", "") == "densenet_40" else None
    pairs = conv_bn_pairs(model)
    scores, rates, chosen = {}, {}, {}
    for g in find_groups(model, x[:1]):
        if not g.prunable:
            continue
        channels = sorted(choose(g))
        if not channels:
            continue
        for m in g.members:
            zero_filters(model, m, channels, pairs, dense)
            s = np.ones(g.channels)
            s[channels] = 0
            scores[m] = s
            rates[m] = (len(channels) + 0.5) / g.channels  # int(rate * C) == len(channels)
            chosen[m] = channels
    return make_plan(model, scores, rates, example_input=x[:1]), chosen


def random_choice(seed: int = 0):
    rng = np.random.default_rng(seed)
    return lambda g: rng.choice(g.channels, size=max(1, g.channels // 4), replace=False).tolist()


def resnet56_choice(g) -> list[int]:
    # Stream positions 8..23 (stage 2) and 16..47 (stage 3) receive the previous stream through the option-A
    # shortcut; they are zero only where the source channel is zero too (stream-1 ch 1 -> 9 -> 25).
    return {"conv1": [1, 5, 12], "layer2.0.conv2": [0, 9, 30], "layer3.0.conv2": [3, 25, 60]}.get(
        g.members[0], [0, 2, g.channels - 1])


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / max(1.0, float(b.abs().max())))


# --------------------------------------------------------------------------------------------------------
# Physical pruning
# --------------------------------------------------------------------------------------------------------

CASES = {
    "resnet_56": (lambda: models.create("resnet_56"), resnet56_choice),
    "vgg_16_bn": (lambda: models.create("vgg_16_bn"), random_choice(1)),
    "densenet_40": (lambda: models.create("densenet_40"), random_choice(2)),
    "googlenet": (lambda: models.create("googlenet"), random_choice(3)),
    "resnet_50": (lambda: models.create("resnet_50"), random_choice(4)),
    "resnet18_torchvision_style": (ResNet18, random_choice(5)),
    "mobilenetv2_style": (MobileNetV2, random_choice(6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_pruning_zeroed_filters_keeps_outputs(case):
    build, choose = CASES[case]
    torch.manual_seed(0)
    model = randomize_bn(build()).eval()
    plan, chosen = zeroed_plan(model, X32, choose)
    with torch.no_grad():
        ref = model(X32)
    macs_before = flops.count(model).macs
    assert apply_plan(model, plan, example_input=X32[:1]) is model
    assert model.hrank_mode == "physical" and model.hrank_plan is plan
    modules = dict(model.named_modules())
    for conv, channels in chosen.items():
        assert modules[conv].out_channels == plan.channels[conv] - len(channels)
        assert plan.layers[conv] == [c for c in range(plan.channels[conv]) if c not in channels]
    with torch.no_grad():
        out = model(X32)
    assert close(out, ref) <= 1e-5
    assert flops.count(model).macs < macs_before
    assert not model.training


def test_mobilenet_depthwise_couples_with_its_producer():
    groups = find_groups(MobileNetV2(), X32[:1])
    by_first = {g.members[0]: g for g in groups}
    # t=1 block: the depthwise conv reads the stem directly; t=6 blocks: expand conv + depthwise conv
    assert by_first["features.0.0"].members == ("features.0.0", "features.1.conv.0")
    assert by_first["features.2.conv.0"].members == ("features.2.conv.0", "features.2.conv.3")
    # the residual stream of the 24-channel stage: both projections
    assert by_first["features.2.conv.6"].members == ("features.2.conv.6", "features.3.conv.6")


@pytest.mark.parametrize("case", ["vgg_16_bn", "densenet_40", "resnet18_torchvision_style", "mobilenetv2_style"])
def test_mask_mode_equals_physical_mode(case):
    """Without an option-A shortcut, a coupled plan's masks zero exactly what physical pruning removes."""
    torch.manual_seed(0)
    model = randomize_bn(CASES[case][0]()).eval()
    rng = np.random.default_rng(0)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    shapes = {n: m.weight.shape for n, m in convs.items()}
    scores = {n: rng.random(m.out_channels) for n, m in convs.items()}
    groups = [g for g in find_groups(model, X32[:1]) if g.prunable]
    rates = {m: float(rng.uniform(0.2, 0.7)) for g in groups for m in g.members}
    plan = make_plan(model, scores, rates, example_input=X32[:1], groups=groups)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask", example_input=X32[:1])
    physical = apply_plan(model, plan, example_input=X32[:1])
    for name, m in masked.named_modules():
        if isinstance(m, nn.Conv2d) and name in plan.layers:
            assert m.weight.shape == shapes[name]  # shapes unchanged
    with torch.no_grad():
        assert close(masked(X32), physical(X32)) <= 1e-5


def test_physical_result_is_a_plain_module_and_keeps_train_mode():
    model = models.create("resnet_20")
    model.train()
    plan = make_plan(model, {n: np.arange(float(m.out_channels)) for n, m in model.named_modules()
                             if isinstance(m, nn.Conv2d)}, "[0.5]*19")
    keys = list(model.state_dict())
    apply_plan(model, plan)
    assert model.training and all(m.training for m in model.modules())
    assert list(model.state_dict()) == keys
    assert model.layer2[0].shortcut.in_channels == 8 and model.layer2[0].shortcut.out_channels == 16
    clone = copy.deepcopy(model).eval()
    traced = torch.jit.trace(clone, X32)
    assert torch.allclose(traced(X32), clone(X32))


def test_frozen_model_under_no_grad():
    model = models.create("resnet_20")
    for p in model.parameters():
        p.requires_grad_(False)
    scores = {n: np.arange(float(m.out_channels)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    with torch.no_grad():  # Torch-Pruning traces autograd; hrank enables it for the trace
        apply_plan(model, make_plan(model, scores, "[0.5]*19"))
        assert model.layer3[0].conv1.weight.shape == (32, 16, 3, 3) and model(X32).shape == (3, 10)


def test_plan_misuse_is_refused():
    model = models.create("resnet_20")
    scores = {n: np.arange(float(m.out_channels)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    independent = make_plan(model, scores, "[0.5]*19", coupling="independent")
    with pytest.raises(HRankError, match="only valid in mask mode"):
        apply_plan(model, independent)
    plan = make_plan(model, scores, "[0.5]*19")
    with pytest.raises(HRankError, match="plan is for resnet_20, but the model is resnet_32"):
        apply_plan(models.create("resnet_32"), plan)
    foreign = copy.deepcopy(plan)
    foreign.arch = None
    with pytest.raises(HRankError, match="expects 16 filters in conv1, the model has 8"):
        apply_plan(_narrow_resnet20(), foreign)
    with pytest.raises(HRankError, match="unknown mode"):
        apply_plan(model, plan, mode="zero")
    apply_plan(model, plan)
    with pytest.raises(HRankError, match="already pruned"):
        apply_plan(model, plan)
    with pytest.raises(HRankError, match="already pruned"):
        make_plan(model, scores, "[0.5]*19")


def _narrow_resnet20() -> nn.Module:
    m = models.create("resnet_20")
    del m.hrank_arch
    m.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    return m


class HardCodedView(nn.Module):
    """Channel arithmetic written as a literal: Torch-Pruning cannot rewrite it (a known failure)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(nn.functional.adaptive_avg_pool2d(self.conv(x), 4).view(-1, 128))


def test_tp_failures_become_one_line_errors():
    net = HardCodedView()
    x = torch.zeros(2, 3, 8, 8)
    with pytest.raises(HRankError, match="cannot prune group conv: removing its channels makes the network fail to "
                                         "run"):  # found when planning, by pruning a copy
        make_plan(net, {"conv": np.arange(8.0)}, {"conv": 0.5}, example_input=x)
    # a plan made without that trial (groups given) is refused by apply_plan's own check
    plan = make_plan(net, {"conv": np.arange(8.0)}, {"conv": 0.5}, example_input=x, groups=find_groups(net, x))
    with pytest.raises(HRankError) as e:
        apply_plan(net, plan, example_input=x)
    assert "forward check" in str(e.value) or "output shape" in str(e.value)
    with pytest.raises(HRankError, match="cannot trace the model"):
        make_plan(models.create("resnet_20"), {}, "[0.0]*19", example_input=torch.zeros(1, 5, 32, 32))


# --------------------------------------------------------------------------------------------------------
# Mask mode: HRank's masks
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def selection(reference_dir):
    return json.loads((reference_dir / "official_selection.json").read_text())


@pytest.mark.parametrize("arch", ["resnet_56", "densenet_40"])
def test_independent_masks_reproduce_official_masks(arch, selection, reference_dir):
    s = selection[arch]["strings"]["current"]
    folder = reference_dir / "official_ranks" / arch
    scores = {c["module"]: np.load(folder / c["rank_file"]) for c in s["convs"]}
    model = randomize_bn(models.create(arch))
    plan = make_plan(model, scores, s["compress_rate_string"], coupling="independent")
    apply_plan(model, plan, mode="mask")
    params = dict(model.named_parameters())
    for conv in s["convs"]:
        if conv["boundary_tie"]:
            continue
        pruned = sorted(set(range(conv["C"])) - set(conv["kept"]))
        w = params[conv["module"] + ".weight"]
        assert (w[pruned] == 0).all() and (w[conv["kept"]].abs().sum((1, 2, 3)) > 0).all()
        for name in conv["co_masked_params"]:
            p = params[name]
            offset = p.shape[0] - conv["C"] if conv.get("co_mask_is_cat_with_previous") else 0
            assert (p[[offset + c for c in pruned]] == 0).all(), name
            assert (p[[offset + c for c in conv["kept"]]] != 0).all(), name


def test_enforce_masks_after_optimizer_steps():
    model = models.create("resnet_20")
    scores = {n: np.arange(float(m.out_channels)) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = make_plan(model, scores, "[0.5]*19")
    apply_plan(model, plan, mode="mask")
    stream_kept = plan.layers["conv1"]  # layer1.0.conv1 reads the stem's stream: its pruned columns are masked too
    stream_pruned = [c for c in range(16) if c not in stream_kept]
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(X32).sum().backward()
        opt.step()
        with torch.no_grad():  # anything that revives masked weights (e.g. a step on a perturbed model)
            for p in model.parameters():
                p.add_(0.01)
        kept = model.layer1[0].conv1.weight[8:][:, stream_kept].clone()
        enforce_masks(model)
        assert torch.equal(model.layer1[0].conv1.weight[8:][:, stream_kept], kept)
        assert model.layer1[0].conv1.weight[:, stream_pruned].abs().sum() == 0
    conv, bn = model.layer1[0].conv1, model.layer1[0].bn1
    assert conv.weight[:8].abs().sum() == 0 and bn.weight[:8].abs().sum() == 0 and bn.bias[:8].abs().sum() == 0
    assert conv.weight.shape == (16, 16, 3, 3)
    plain = models.create("resnet_20")
    before = copy.deepcopy(plain.state_dict())
    enforce_masks(plain)
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


# --------------------------------------------------------------------------------------------------------
# BN recalibration
# --------------------------------------------------------------------------------------------------------

def test_recalibrate_bn_cumulative_average():
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, momentum=0.3), nn.Dropout(0.5), nn.Flatten(),
                        nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6))
    net.eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(5, 3, 8, 8, generator=g), torch.zeros(5)) for _ in range(3)]
    used = recalibrate_bn(net, batches, num_images=11)
    assert used == 12  # 5 + 5, then the last batch cut to 2 images (never 1: BatchNorm1d needs 2)
    assert not net.training and net[1].momentum == 0.3 and not net[1].training
    with torch.no_grad():
        feats = [net[0](x) for x, _ in batches]
        feats[2] = feats[2][:2]
        means = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    assert torch.allclose(net[1].running_mean, means, atol=1e-6)
    assert int(net[1].num_batches_tracked) == 3


# --------------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------------

def _pruned(arch: str, mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(models.create(arch))
    rng = np.random.default_rng(0)
    scores = {n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    n = len(models.rate_entries(arch))
    return apply_plan(model, make_plan(model, scores, f"[0.3]+[0.5]*{n - 1}"), mode=mode).eval()


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_save_load_round_trip_bit_identical(tmp_path, mode):
    model = _pruned("resnet_20", mode)
    path = hrank.save(model, tmp_path / "m.pt", normalization="imagenet", extra={"note": "test", "epochs": 3})
    raw = torch.load(path, weights_only=True)  # plain data: loads with weights_only, no modules inside
    assert set(raw) == {"format", "hrank_record", "state_dict"} and isinstance(raw["hrank_record"], str)
    loaded, meta = hrank.load(path)
    assert meta["arch"] == "resnet_20" and meta["mode"] == mode and meta["extra"] == {"note": "test", "epochs": 3}
    assert meta["normalization"]["name"] == "imagenet" and meta["num_classes"] == 10
    assert meta["plan"].to_json() == model.hrank_plan.to_json()
    with torch.no_grad():
        assert torch.equal(loaded(X32), model(X32))
    record = model_record(model)
    assert "state_dict" not in record and json.loads(json.dumps(record)) == record  # metadata only, plain JSON
    again = build_from_record(model_record(model, weights=True)).eval()
    with torch.no_grad():
        assert torch.equal(again(X32), model(X32))


def test_save_load_outside_registry_needs_builder(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(ResNet18()).eval()
    rng = np.random.default_rng(0)
    scores = {n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rates = {"layer*.conv1": 0.5, "layer3.*": 0.25, "conv1": 0.25}
    apply_plan(model, make_plan(model, scores, rates, example_input=X32[:1]), example_input=X32[:1])
    path = save(model, tmp_path / "r18.pt")
    with pytest.raises(HRankError, match="builder="):
        load(path)
    loaded, meta = load(path, builder=ResNet18)
    assert meta["arch"] is None
    with torch.no_grad():
        assert torch.equal(loaded(X32), model(X32))


def test_load_errors(tmp_path):
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(HRankError, match="not a model saved by hrank.save"):
        load(tmp_path / "plain.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(HRankError, match="cannot read model file"):
        load(tmp_path / "junk.pt")
    model = _pruned("resnet_20", "physical")
    path = save(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    raw["state_dict"]["conv1.weight"] = torch.zeros(16, 3, 3, 3)  # unpruned width: does not fit the plan
    torch.save(raw, tmp_path / "bad.pt")
    with pytest.raises(HRankError, match="does not fit"):
        load(tmp_path / "bad.pt")
