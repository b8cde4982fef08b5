"""Mutation-killing tests for hrank.prune's physical pruner (bench/mutation.py, docs/mutation.md): a grouped
conv's input columns removed block by block (non-square kernels, unsorted drops), checked against hand-sliced
weights and hand-zeroed networks; plans whose coupling does not fit the model refused with the model's own
coupling named."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hrank.errors import HRankError
from hrank.layers import is_conv
from hrank.plan import make_plan
from hrank.prune import _grouped_in_weight, apply_plan
from tests.test_plan_general import GroupedBlock

# --------------------------------------------------------------------------------------------------------
# _grouped_in_weight against hand-sliced weights
# --------------------------------------------------------------------------------------------------------

# (out, groups, per-group input width, drop (unsorted, input indices), kept local columns per block)
CASES = [
    (8, 2, 4, [6, 1, 3, 4], [[0, 2], [1, 3]]),
    (12, 3, 2, [5, 0, 2], [[1], [1], [0]]),
    (8, 4, 3, [11, 0, 4, 7], [[1, 2], [0, 2], [0, 2], [0, 1]]),
]


@pytest.mark.parametrize("kernel", [(3, 2), (1, 3), (3, 1)])
@pytest.mark.parametrize(("out", "groups", "per", "drop", "kept"), CASES)
def test_grouped_in_weight_keeps_each_blocks_own_columns(out, groups, per, drop, kept, kernel):
    torch.manual_seed(0)
    weight = torch.randn(out, per, *kernel)
    rows = out // groups
    expected = torch.cat([weight[b * rows:(b + 1) * rows][:, kept[b]] for b in range(groups)])
    got = _grouped_in_weight(weight, groups, drop)
    assert got.shape == (out, len(kept[0]), *kernel)
    assert torch.equal(got, expected)
    # the sliced conv on the surviving input channels == the full conv on an input with the dropped ones zeroed
    x = torch.randn(2, per * groups, 5, 6)
    zeroed = x.clone()
    zeroed[:, drop] = 0
    survivors = [c for c in range(per * groups) if c not in drop]
    ref = F.conv2d(zeroed, weight, groups=groups, padding=(kernel[0] // 2, kernel[1] // 2))
    y = F.conv2d(x[:, survivors], got, groups=groups, padding=(kernel[0] // 2, kernel[1] // 2))
    assert torch.allclose(y, ref, atol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Physical pruning through a grouped conv with a non-square kernel
# --------------------------------------------------------------------------------------------------------


def _scores(model: nn.Module) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: rng.random(m.out_channels) for n, m in model.named_modules() if is_conv(m)}


def _tall_model() -> GroupedBlock:
    torch.manual_seed(0)
    model = GroupedBlock(kernel=(3, 1))  # a non-square kernel: the grouped input slices are not square
    with torch.no_grad():  # non-trivial BN so that a wrong column shows in the output
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.mark.parametrize("unsorted", [False, True])
def test_grouped_non_square_kernel_physical_equals_hand_zeroed_network(unsorted):
    model = _tall_model()
    x = torch.randn(3, 3, 7, 5)
    scores = _scores(model)
    # highest two per block of 4 survive: block 0 keeps 0, 2; block 1 keeps 5, 7; block 2 keeps 8, 9; 3: 12, 15
    scores["a"] = np.array([5, 0, 6, 1, 0, 5, 1, 6, 5, 6, 0, 1, 4, 0, 0.5, 6], dtype=float)
    plan = make_plan(model, scores, {"a": 0.5}, example_input=x[:1])
    kept = [0, 2, 5, 7, 8, 9, 12, 15]
    assert plan.layers["a"] == kept
    if unsorted:  # a plan's kept list in any order describes the same network
        plan.groups[0].kept = [9, 15, 2, 7, 0, 12, 5, 8]
    physical = apply_plan(copy.deepcopy(model), plan, example_input=x[:1]).eval()
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask", example_input=x[:1]).eval()

    # reference: the unpruned network with a's pruned filters (weights and bias) zeroed by hand
    zeroed = copy.deepcopy(model)
    pruned = [c for c in range(16) if c not in kept]
    with torch.no_grad():
        zeroed.a.weight[pruned] = 0
        zeroed.a.bias[pruned] = 0
    assert physical.a.out_channels == 8 and torch.equal(physical.a.weight, model.a.weight[kept])
    local = [[0, 2], [1, 3], [0, 1], [0, 3]]  # kept columns of each block, within the block
    expected_b = torch.cat([model.b.weight[4 * blk:4 * blk + 4][:, local[blk]] for blk in range(4)])
    assert physical.b.weight.shape == (16, 2, 3, 1) and physical.b.in_channels == 8 and physical.b.groups == 4
    assert torch.equal(physical.b.weight, expected_b)
    with torch.no_grad():
        ref = zeroed(x)
        assert torch.allclose(physical(x), ref, atol=1e-5, rtol=1e-4)
        assert torch.allclose(masked(x), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_input_pruning_on_cuda():
    model = _tall_model().cuda()
    x = torch.randn(2, 3, 7, 5, device="cuda")
    scores = _scores(model)
    scores["a"] = np.array([5, 0, 6, 1, 0, 5, 1, 6, 5, 6, 0, 1, 4, 0, 0.5, 6], dtype=float)
    plan = make_plan(model, scores, {"a": 0.5}, example_input=x[:1])
    physical = apply_plan(copy.deepcopy(model), plan, example_input=x[:1]).eval()
    assert physical.b.weight.device.type == "cuda" and physical.b.weight.shape == (16, 2, 3, 1)
    masked = apply_plan(copy.deepcopy(model), plan, mode="mask", example_input=x[:1]).eval()
    with torch.no_grad():
        assert torch.allclose(physical(x), masked(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------
# A plan whose coupling does not fit the model
# --------------------------------------------------------------------------------------------------------


class Stream(nn.Module):
    """A stem conv s0 and four 3x3 convs c1..c4; ``residual``: each adds into the stem's stream (all five
    coupled), else a plain chain (each alone); ``skip_last``: c4 exists but never runs."""

    def __init__(self, residual: bool, skip_last: bool = False) -> None:
        super().__init__()
        self.residual, self.skip_last = residual, skip_last
        self.s0 = nn.Conv2d(3, 8, 3, padding=1)
        self.c1, self.c2, self.c3, self.c4 = (nn.Conv2d(8, 8, 3, padding=1) for _ in range(4))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.s0(x)
        for conv in (self.c1, self.c2, self.c3) if self.skip_last else (self.c1, self.c2, self.c3, self.c4):
            y = conv(torch.relu(x))
            x = x + y if self.residual else y
        return self.fc(x.mean((2, 3)))


def _stream_plan(model: nn.Module, spec: dict):
    return make_plan(model, _scores(model), spec, example_input=torch.randn(1, 3, 6, 6))


def test_plan_coupling_other_convs_is_refused_naming_the_models_group():
    torch.manual_seed(0)
    plan = _stream_plan(Stream(residual=False), {"s0": 0.5})  # the chain: s0 is a group of its own
    assert [g.members for g in plan.pruned_groups()] == [["s0"]]
    model = Stream(residual=True).eval()  # same convs, but the adds couple all five
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(HRankError) as info:
        apply_plan(model, plan, example_input=torch.randn(1, 3, 6, 6))
    assert "the plan couples s0 but this model couples s0, c1, c2, c3 (plan for another model?)" in str(info.value)
    assert model.s0.out_channels == 8 and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_plan_for_a_conv_the_model_never_runs_is_refused():
    torch.manual_seed(0)
    plan = _stream_plan(Stream(residual=False), {"c4": 0.5})
    model = Stream(residual=False, skip_last=True).eval()  # c4 is there at full width but outside the graph
    with pytest.raises(HRankError) as info:
        apply_plan(model, plan, example_input=torch.randn(1, 3, 6, 6), check=False)
    assert "the plan couples c4 but this model couples nothing (plan for another model?)" in str(info.value)
    assert model.c4.out_channels == 8
