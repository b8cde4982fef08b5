"""User CNNs an audit found pruned wrongly, refused late or failing raw: concatenations with untraced tensors,
ops that mix channels at equal shape, transposed flattens, shared convs in the budget, InstanceNorm statistics,
several outputs, several inputs. Each pruned network is checked against a reference built without hrank's
channel mapping: the unpruned model with the planned filters zeroed at their producers."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hrank.prune as prune_module
from hrank.budget import find_budget
from hrank.errors import HRankError
from hrank.layers import is_conv
from hrank.plan import find_groups, make_plan
from hrank.prune import apply_plan
from hrank.ranks import compute_ranks
from hrank.spec import Spec


def cbr(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())


def _scores(model: nn.Module) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}


def _settled(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """BatchNorm statistics that are not the identity, so a channel in the wrong place changes the output."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, *x.shape[1:]))
    return model.eval()


def _zeroed_reference(model: nn.Module, plan) -> nn.Module:
    """The unpruned model with each pruned filter zeroed in its conv and in the BatchNorm after it (cbr blocks):
    what the plan says the network computes, written without any channel mapping."""
    ref = copy.deepcopy(model)
    modules = dict(ref.named_modules())
    with torch.no_grad():
        for g in plan.pruned_groups():
            gone = [c for c in range(g.channels) if c not in set(g.kept)]
            for member in g.members:
                block = modules[member.rpartition(".")[0]]
                for layer in block[:2]:
                    layer.weight[gone] = 0
                    layer.bias[gone] = 0
    return ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _check_against_reference(model: nn.Module, x: torch.Tensor, spec: dict) -> object:
    plan = make_plan(model, _scores(model), Spec.from_mapping(model, spec), example_input=x)
    assert plan.pruned_groups()
    ref = _zeroed_reference(model, plan)
    z = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        expected = ref(z)
        for mode in ("physical", "mask"):
            pruned = apply_plan(copy.deepcopy(model), plan, mode=mode, example_input=x).eval()
            assert _rel(pruned(z), expected) < 1e-5, mode
    return plan


class CoordNet(nn.Module):
    """CoordConv: two coordinate channels built in forward, concatenated before the conv features."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = cbr(3, 16), cbr(18, 16), nn.Linear(16, 10)

    def forward(self, x):
        y = self.a(x)
        n, _, h, w = y.shape
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        coords = torch.stack([xx, yy]).expand(n, 2, h, w)
        return self.fc(self.b(torch.cat([coords, y], 1)).mean((2, 3)))


class InputDense(nn.Module):
    """DenseNet-style growth that starts from the image: the input is concatenated into the stream."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.fc = cbr(3, 16), cbr(19, 16), cbr(35, 8), nn.Linear(8, 10)

    def forward(self, x):
        y = torch.cat([x, self.a(x)], 1)
        y = torch.cat([y, self.b(y)], 1)
        return self.fc(self.c(y).mean((2, 3)))


@pytest.mark.parametrize("cls", [CoordNet, InputDense])
def test_concatenation_with_an_untraced_tensor_prunes_the_right_channels(cls):
    x = torch.randn(2, 3, 16, 16)
    model = _settled(cls(), x)
    groups = {g.members: g for g in find_groups(model, x)}
    assert ("a.0",) in groups and ("b.0",) in groups, groups  # separate groups, not coupled through the stream
    plan = _check_against_reference(model, x, {"*": 0.5})
    assert {g.members[0] for g in plan.pruned_groups()} >= {"a.0", "b.0"}


class _AfterConv(nn.Module):
    def __init__(self, op) -> None:
        super().__init__()
        self.op = op
        self.a, self.c, self.fc = cbr(3, 16), cbr(16, 8), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.c(self.op(self.a(x))).mean((2, 3)))


class _Maxout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.c, self.fc = cbr(3, 16), cbr(8, 8), nn.Linear(8, 10)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        return self.fc(self.c(y.view(n, c // 2, 2, h, w).amax(2)).mean((2, 3)))


@pytest.mark.parametrize("model, op", [
    (lambda: _AfterConv(lambda y: torch.softmax(y, 1)), "softmax"),
    (lambda: _AfterConv(lambda y: F.log_softmax(y, dim=-3)), "softmax"),
    (lambda: _AfterConv(lambda y: y.flip(1)), "flip"),
    (lambda: _AfterConv(lambda y: torch.roll(y, 1, 1)), "roll"),
    (lambda: _AfterConv(lambda y: torch.cumsum(y, dim=1)), "cumsum"),
    (lambda: _AfterConv(nn.LocalResponseNorm(5, alpha=1.0)), None),
    (_Maxout, "view"),
])
def test_ops_that_mix_channels_are_skipped_when_planning(model, op):
    x = torch.randn(2, 3, 16, 16)
    net = _settled(model(), x)
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"*": 0.4}), example_input=x)
    skipped = {s["conv"]: s["reason"] for s in plan.skipped}
    assert "a.0" in skipped and (op is None or op in skipped["a.0"]), skipped
    assert [g.members for g in plan.pruned_groups()] == [["c.0"]]
    apply_plan(copy.deepcopy(net), plan, example_input=x)  # the rest prunes (and passes the invariant)


def test_ops_along_other_dims_do_not_block_pruning():
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_AfterConv(lambda y: torch.roll(y.flip(3), 1, dims=2).cumsum(-1)), x)
    plan = _check_against_reference(net, x, {"*": 0.4})
    assert "a.0" in {g.members[0] for g in plan.pruned_groups()}


class _TransposedFlatten(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 16), cbr(16, 8)
        self.fc = nn.Linear(8 * 16, 10)

    def forward(self, x):
        y = F.max_pool2d(self.b(self.a(x)), 4)
        n, c, h, w = y.shape
        return self.fc(y.view(n, c, h * w).transpose(1, 2).reshape(n, -1))


def test_a_transposed_flatten_is_skipped_not_a_raw_index_error():
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_TransposedFlatten(), x)
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"*": 0.4}), example_input=x)
    skipped = {s["conv"]: s["reason"] for s in plan.skipped}
    assert "mapped past" in skipped.get("b.0", ""), skipped
    apply_plan(copy.deepcopy(net), plan, example_input=x)


class _PermutedFlatten(nn.Module):
    """A flatten of the channels-last layout: Torch-Pruning maps it as channels-first."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = cbr(3, 8), nn.Linear(8 * 16, 10)

    def forward(self, x):
        return self.fc(F.max_pool2d(self.a(x), 4).permute(0, 2, 3, 1).flatten(1))


def test_mask_mode_refuses_a_plan_the_physical_prune_refuses():
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_PermutedFlatten(), x)
    # without the planning trial (groups given), only apply_plan's invariant check stands in the way
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"*": 0.5}), example_input=x,
                     groups=find_groups(net, x))
    assert plan.pruned_groups()
    before = copy.deepcopy(net.state_dict())
    for mode in ("physical", "mask"):
        with pytest.raises(HRankError, match="does not compute"):
            apply_plan(net, plan, mode=mode, example_input=x)
        assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # all or nothing


class _ChannelsLastHead(nn.Module):
    """Two prunable convs, then a channels-last flatten into the classifier (a ported Keras model's head)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.fc = cbr(3, 16), cbr(16, 16), cbr(16, 8), nn.Linear(8 * 16, 10)

    def forward(self, x):
        y = self.c(self.b(self.a(x)))
        return self.fc(F.max_pool2d(y, 4).permute(0, 2, 3, 1).flatten(1))


def test_a_group_the_trace_maps_wrongly_is_skipped_when_planning():
    """The planning trial prunes a copy, finds the group whose removal changes the output, and leaves it whole:
    patterns and budgets prune the rest (the invariant holds), an exact rate for it is a one-line error."""
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_ChannelsLastHead(), x)
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"*": 0.5}), example_input=x)
    assert [s["conv"] for s in plan.skipped] == ["c.0"] and "changes what the network computes" in \
        plan.skipped[0]["reason"]
    assert {g.members[0] for g in plan.pruned_groups()} == {"a.0", "b.0"}
    pruned = apply_plan(copy.deepcopy(net), plan, example_input=x)  # checked against the masked model
    assert pruned.a[0].out_channels == pruned.b[0].out_channels == 8 and pruned.c[0].out_channels == 8
    result = find_budget(net, _scores(net), target=0.6, metric="macs", example_input=x, round_to=1)
    assert result.error < 0.01 and "c.0" not in result.group_pruned and set(result.group_pruned) <= {"a.0", "b.0"}
    apply_plan(copy.deepcopy(net), make_plan(net, _scores(net), result.spec, example_input=x), example_input=x)
    with pytest.raises(HRankError, match="cannot prune group c.0: removing its channels changes"):
        make_plan(net, _scores(net), Spec.from_mapping(net, {"c.0": 0.5}), example_input=x)


class _TwoHeads(nn.Module):
    """A large, exact output beside a small one that depends on the channel count."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = cbr(3, 16), cbr(16, 16), nn.Linear(16, 10)

    def forward(self, x):
        stem = self.a(x)
        y = self.b(stem)
        return {"features": stem * 1000, "logits": self.fc(y.mean((2, 3)) / y.shape[1] ** 0.5)}


def test_each_output_is_held_to_the_tolerance_on_its_own():
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_TwoHeads(), x)
    with pytest.raises(HRankError, match="cannot prune group b.0: removing its channels changes what the network "
                                         "computes"):  # the planning trial holds each output to it too
        make_plan(net, _scores(net), Spec.from_mapping(net, {"b.0": 0.5}), example_input=x)
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"b.0": 0.5}), example_input=x,
                     groups=find_groups(net, x))
    with pytest.raises(HRankError, match="does not compute"):
        apply_plan(copy.deepcopy(net), plan, example_input=x)


class _SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(16), nn.BatchNorm2d(16)
        self.c, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.a(x))
        y = F.relu(self.bn1(self.shared(y)))
        y = F.relu(self.bn2(self.shared(y)))  # the same conv again
        return self.fc(F.relu(self.c(y)).mean((2, 3)))


@pytest.mark.parametrize("metric", ["macs", "params"])
def test_budget_counts_a_conv_called_twice(metric):
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_SharedConv(), x)
    result = find_budget(net, _scores(net), target=0.5, metric=metric, example_input=x, round_to=1)
    assert abs(result.achieved / result.baseline - 0.5) < 0.05, result.describe()
    assert result.achieved == (result.macs if metric == "macs" else result.params)


class _InstanceNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.InstanceNorm2d(16, affine=True, track_running_stats=True)
        self.c, self.fc = nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(F.relu(self.c(F.relu(self.norm(self.a(x))))).mean((2, 3)))


def test_instance_norm_running_statistics_are_pruned_with_it():
    x = torch.randn(2, 3, 16, 16)
    net = _settled(_InstanceNet(), x)
    plan = make_plan(net, _scores(net), Spec.from_mapping(net, {"a": 0.5}), example_input=x)
    pruned = apply_plan(copy.deepcopy(net), plan, example_input=x)
    assert pruned.norm.running_mean.shape == (8,) and pruned.norm.running_var.shape == (8,)
    kept = plan.layers["a"]
    assert torch.equal(pruned.norm.running_mean, net.norm.running_mean[kept])


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.fc = cbr(3, 8), cbr(3, 8), nn.Linear(16, 10)

    def forward(self, x, y):
        return self.fc(torch.cat([self.a(x), self.b(y)], 1).mean((2, 3)))


def test_a_model_with_two_inputs_is_refused_in_one_line():
    net, x = _TwoInputs().eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(HRankError, match="model failed on images .*TypeError.*one batch of images"):
        compute_ranks(net, torch.randn(4, 3, 16, 16), num_images=4, progress=False)
    with pytest.raises(HRankError, match="example_input must be one tensor"):
        make_plan(net, _scores(net), Spec.from_mapping(net, {"*": 0.4}), example_input=(x, x))
    with pytest.raises(HRankError, match="example_input must be one tensor"):
        prune_module._example_input(net, None, (x, x))
