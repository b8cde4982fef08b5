"""Budgets: find per-layer rates that hit a MACs or params target on the *real* pruned network.

HRank's rates are set by hand. Here a target (e.g. keep 50% of the MACs) is turned into rates: the
prunable coupled groups give up filters one at a time in a fixed order (see ``ORDERS``), and the number
of filters removed is found by bisection over an exact cost model read off the dependency graph
(removing k channels of a group removes k output channels of its members and k input channels, or k x
positions features, of every consumer), and the answer is confirmed by physically pruning a copy and
counting it with :func:`hrank.flops.count`. The result is a :class:`hrank.spec.Spec`, printable in HRank's
list syntax when the model has a rate-entry order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from hrank import flops, models
from hrank.errors import HRankError
from hrank.layers import is_depthwise, per_filter_extras
from hrank.modelcopy import copy_model
from hrank.plan import Group, build_dependency_graph, find_groups, make_plan, verify_groups
from hrank.prune import apply_plan
from hrank.spec import Spec, num_pruned

TOLERANCE = 0.01

# The order in which groups give up filters as the budget tightens (ties: module order).
#   uniform: smallest resulting rate first: every group ends near the same rate.
#   coupled: a group's rate is weighed by its member count, so a residual stream or concatenation whose
#            channels feed many convs is pruned that many times more slowly than a single conv. This keeps
#            the shared streams wide, as HRank's hand-made strings do, and keeps far more accuracy before
#            fine-tuning (ResNet-56 at 50% MACs, BN recalibrated: 58.4% vs 39.6% uniform; docs/pruning.md).
#   score:   globally by each group's per-channel score relative to the group's best channel.
#   capacity: coupled, with each group's key scaled by the cube root of the params one of its channels holds
#            per MAC it costs (CAPACITY_EXPONENT): at a MACs target, channels that cost many MACs for few weights
#            (early, high-resolution layers) go first, so more parameters are kept at the same MACs. The root
#            keeps it between coupled and a greedy params-per-MAC cut; the cube root did better than the square
#            root after pruning on four pretrained CIFAR ResNets (docs/pruning.md, bench/budget_orders.py).
ORDERS = ("coupled", "uniform", "score", "capacity")
ORDER_DEFAULT = "coupled"
# Pruned groups keep a multiple of this many channels when a target allows (docs/benchmarks.md: widths such
# as 16 -> 11 or 64 -> 61 run convolutions at a fraction of the speed of 8 or 56 on CPU; GPUs favour multiples
# of 8 as well). 1 turns rounding off.
ROUND_TO_DEFAULT = 8
CAPACITY_EXPONENT = 1 / 3


@dataclass
class BudgetResult:
    """The spec found, what it achieves on the real pruned network, and how it was found."""

    spec: Spec
    metric: str  # "macs" or "params"
    target: float  # absolute count
    achieved: float  # absolute count of the real pruned network
    baseline: float
    macs: int
    params: int
    evaluations: int  # physical prunes done to confirm the answer
    group_pruned: dict[str, int] = field(default_factory=dict)  # first member -> filters removed
    round_to: int = 1  # the width multiple the answer keeps (1 when rounding was off or had to be dropped)
    order: str = ORDER_DEFAULT  # the order the answer came from (another than asked when that one was too coarse)

    @property
    def error(self) -> float:
        """Relative distance of the achieved count from the target."""
        return abs(self.achieved - self.target) / self.target

    def describe(self) -> str:
        """One line: what the pruned network counts against the target."""
        return (f"{flops.format_count(self.achieved)} {self.metric} = {self.achieved / self.baseline:.1%} of the "
                f"unpruned model (target {flops.format_count(self.target)}, off by {self.error:.2%})")

    def hrank_string(self) -> str | None:
        """The rates in HRank's list syntax, or None when the model has no rate-entry order for them."""
        try:
            return self.spec.to_hrank_string()
        except HRankError:
            return None

    def to_json(self) -> dict:
        return {"metric": self.metric, "target": self.target, "achieved": self.achieved, "baseline": self.baseline,
                "ratio": self.achieved / self.baseline, "error": self.error, "macs": self.macs,
                "params": self.params, "evaluations": self.evaluations, "compress_rate": self.hrank_string(),
                "round_to": self.round_to, "order": self.order, "rates": dict(self.spec.rates)}


def readable_rate(n: int, channels: int) -> float:
    """The shortest decimal ``r`` with ``int(r * channels) == n`` (HRank's rule), e.g. 5 of 16 -> 0.32."""
    if n == 0:
        return 0.0
    for digits in range(1, 10):
        scale = 10**digits
        low = n * scale // channels  # exact: the float quotient n / C * scale can land one below (29/50 -> 57.99..)
        for k in (low, low + 1):  # low + 1 exceeds n / C by >= 1e-9 of a channel: no float error takes it below
            if num_pruned(k / scale, channels) == n:
                return k / scale
    r = (n + 0.5) / channels
    assert num_pruned(r, channels) == n
    return r


def parse_target(value: str | float) -> float:
    """``0.5`` (a fraction of the baseline), ``62.7M`` / ``1.5B`` / ``490K`` or a plain count."""
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip()
        mult = {"K": 1e3, "M": 1e6, "G": 1e9, "B": 1e9}.get(text[-1:].upper(), 1.0)
        try:
            number = float(text[:-1] if mult != 1.0 else text) * mult
        except ValueError:
            raise HRankError(f"cannot read target {value!r}; use a fraction such as 0.5 or a count such as 62M") \
                from None
    if not math.isfinite(number) or number <= 0:
        raise HRankError(f"target must be positive, got {value!r}")
    return number


def _candidates(model: nn.Module, scores: Mapping[str, np.ndarray], convs: Sequence[str] | None) -> set[str]:
    if convs is not None:
        return set(convs)
    arch = getattr(model, "hrank_arch", None)
    allowed = set(scores)
    if arch is not None:  # the official prunable convs, minus entries the official code never prunes
        spec = models.get_spec(arch)
        allowed &= {c for i, entry in enumerate(models.rate_entries(model)) if i not in spec.fixed_zero_entries
                    for c in entry}
    return allowed


class _CostModel:
    """MACs and params of the physically pruned network as an exact function of filters removed per group."""

    def __init__(self, model: nn.Module, graph: tp.DependencyGraph, groups: Sequence[Group],
                 input_size: tuple[int, ...]) -> None:
        base = flops.count(model, input_size)
        modules = dict(model.named_modules())
        self.layers = []  # [cin, cout, per_io_macs, per_io_params, per_out_params, depthwise, groups]
        index = {}
        for layer in base.layers:
            m = modules[layer.name]
            conv = isinstance(m, nn.modules.conv._ConvNd)
            cin, cout, blocks = ((m.in_channels, m.out_channels, m.groups) if conv
                                 else (m.in_features, m.out_features, 1))
            per_macs = layer.macs // (cin // blocks * cout)  # kernel x positions (a linear: positions)
            if m in index:  # a layer called again (shared weights): its MACs per channel pair add up, params do not
                self.layers[index[m]][2] += per_macs
                continue
            if conv:
                kk = m.kernel_size[0] * m.kernel_size[1]
                per_out = int(m.bias is not None) + sum(t.numel() // m.out_channels for t in
                                                        per_filter_extras(m).values() if isinstance(t, nn.Parameter))
                self.layers.append([cin, cout, per_macs, kk, per_out, is_depthwise(m), blocks])
            else:
                self.layers.append([cin, cout, per_macs, 1, int(m.bias is not None), False, 1])
            index[m] = len(self.layers) - 1
        counted = sum(sum(p.numel() for p in m.parameters(recurse=False)) for m in index)
        self.other_params = base.params - counted
        self.effects = []  # per group: list of (layer index, out removed per channel, in removed per channel)
        for g in groups:
            root = modules[g.members[0]]
            effect: dict[int, list[int]] = {}
            for item in graph.get_pruning_group(root, tp.prune_conv_out_channels, [0]):
                m = item.dep.target.module
                if m not in index:
                    continue
                slot = effect.setdefault(index[m], [0, 0])
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    slot[0] = max(slot[0], len(item.idxs))
                else:
                    slot[1] = max(slot[1], len(item.idxs))
            self.effects.append([(i, o, n) for i, (o, n) in effect.items()])

    def widths(self, counts: Sequence[int]) -> list[tuple[int, int]]:
        """(input, output) channels of every counted layer after removing ``counts`` channels per group (a
        depthwise conv's input count is left as it was: its pruner removes inputs with outputs)."""
        removed_out = [0] * len(self.layers)
        removed_in = [0] * len(self.layers)
        for k, effect in zip(counts, self.effects, strict=True):
            for i, out_per, in_per in effect:
                removed_out[i] += out_per * k
                removed_in[i] += in_per * k
        return [(layer[0] - r_in, layer[1] - r_out)
                for layer, r_out, r_in in zip(self.layers, removed_out, removed_in, strict=True)]

    def params_per_mac(self) -> list[float]:
        """Per group: the params one channel holds per MAC it costs (what removing one channel saves of each;
        a group whose channels cost no MACs gets infinity, one with no params zero)."""
        base_macs, base_params = self([0] * len(self.effects))
        ratios = []
        for gi in range(len(self.effects)):
            one = [0] * len(self.effects)
            one[gi] = 1
            macs, params = self(one)
            saved_macs, saved_params = base_macs - macs, base_params - params
            ratios.append(math.inf if saved_macs <= 0 else max(saved_params, 0) / saved_macs)
        return ratios

    def __call__(self, counts: Sequence[int]) -> tuple[int, int]:
        macs = 0
        params = self.other_params
        for (cin, _, per_macs, per_params, per_out, depthwise, groups), (width_in, out) in zip(
                self.layers, self.widths(counts), strict=True):
            inp = cin // groups if depthwise else width_in // groups  # inputs each filter reads
            macs += inp * out * per_macs
            params += inp * out * per_params + out * per_out  # bias and per-filter extras (a conv's gain)
        return macs, params


def _steps(channels: int, limit: int, round_to: int, blocks: int = 1) -> list[int]:
    """Cumulative channel counts a group may give up: every count up to ``limit``, or with ``round_to`` > 1
    only those that leave a multiple of ``round_to`` channels (widths a CPU or GPU kernel runs efficiently);
    a group split into ``blocks`` by grouped convs gives up the same number from every block."""
    return [k for k in range(1, limit + 1) if (round_to == 1 or (channels - k) % round_to == 0) and k % blocks == 0]


def _search(groups: Sequence[Group], raw: Mapping[str, Any], limits: Sequence[int], order: str,
            value: Callable[[list[int]], float], goal: float, tolerance: float,
            round_to: int = 1, group_steps: Sequence[list[int]] | None = None,
            params_per_mac: Sequence[float] | None = None) -> tuple[list[int], float]:
    """Channels to remove per group, closest to ``goal`` when groups give them up in ``order``
    (``group_steps``: the cumulative counts each group may stop at, instead of those of ``round_to``;
    ``params_per_mac``: per group, from :meth:`_CostModel.params_per_mac`, needed by the capacity order)."""
    if order == "capacity" and params_per_mac is None:
        raise ValueError("the capacity order needs params_per_mac")
    events: list[tuple[float, int, int]] = []  # (key, group, channels this step removes)
    for gi, (g, limit) in enumerate(zip(groups, limits, strict=True)):
        steps = group_steps[gi] if group_steps is not None else _steps(g.channels, limit, round_to, g.blocks)
        if order == "score":  # globally by the group's per-channel score, relative to the group's best
            member_scores = [np.asarray(raw[m], dtype=float) for m in g.members if m in raw]
            s = np.sort(np.mean(member_scores, axis=0))
            s = s / s[-1] if s[-1] > 0 else s
            keys = [float(s[k - 1]) for k in steps]
        elif order == "coupled":  # a group whose channels feed n convs gives them up n times more slowly
            keys = [k / g.channels * len(g.members) for k in steps]
        elif order == "capacity":  # coupled, slower the more weights a channel holds per MAC
            scale = params_per_mac[gi] ** CAPACITY_EXPONENT  # type: ignore[index]
            keys = [k / g.channels * len(g.members) * scale for k in steps]
        else:  # uniform
            keys = [k / g.channels for k in steps]
        events += [(key, gi, k - prev) for key, k, prev in zip(keys, steps, [0, *steps][:-1], strict=True)]
    events.sort()

    def counts_after(n_events: int) -> list[int]:
        counts = [0] * len(groups)
        for _, gi, size in events[:n_events]:
            counts[gi] += size
        return counts

    lo, hi = 0, len(events)
    while hi - lo > 1:  # invariant: value(lo) > goal >= value(hi) (or hi is the last event)
        mid = (lo + hi) // 2
        if value(counts_after(mid)) > goal:
            lo = mid
        else:
            hi = mid
    best = min((counts_after(lo), counts_after(hi)), key=lambda c: abs(value(c) - goal))
    if abs(value(best) - goal) > tolerance * goal:
        # The step at the crossing is too coarse (a group whose channels cost much): from just above the
        # goal, go on in the same order but skip any single removal that would undershoot the window.
        counts = counts_after(lo)
        blocked: set[int] = set()  # a group's steps go in order: once one is skipped, so are its later ones
        for _, gi, size in events[lo:]:
            if gi in blocked:
                continue
            counts[gi] += size
            now = value(counts)
            if now < goal * (1 - tolerance):
                counts[gi] -= size
                blocked.add(gi)
            elif now <= goal * (1 + tolerance):
                break
        best = min((best, counts), key=lambda c: abs(value(c) - goal))
    return best, value(best)


@dataclass
class _Search:
    """What every budget search starts from: the example input, the scores, the coupled groups it may prune
    (each at most ``limits`` channels) and the dependency graph."""

    input_size: tuple[int, ...]
    example_input: torch.Tensor
    raw: Mapping[str, Any]
    allowed: set[str]
    graph: tp.DependencyGraph
    groups: list[Group]
    prunable: list[Group]
    limits: list[int]
    ignore: Sequence[str] | str | None

    def spec(self, model: nn.Module, counts: Sequence[int]) -> Spec:
        """The rates that remove ``counts[i]`` channels from group i (HRank's rule, shortest decimals)."""
        mapping = {}
        for g, n in zip(self.prunable, counts, strict=True):
            rate = readable_rate(n, g.channels)
            mapping.update({m: rate for m in g.members if m in self.allowed or m in self.raw})
        return Spec.from_mapping(model, mapping, ignore=self.ignore or ())

    def prune(self, model: nn.Module, counts: Sequence[int]) -> tuple[Spec, nn.Module]:
        """The spec of ``counts`` and a physically pruned copy of ``model`` built from it."""
        spec = self.spec(model, counts)
        plan = make_plan(model, self.raw, spec, example_input=self.example_input, groups=self.groups)
        return spec, apply_plan(copy_model(model), plan, mode="physical", example_input=self.example_input)


def _prepare(model: nn.Module, scores: Mapping[str, np.ndarray] | object, *, input_size: tuple[int, ...] | None,
             example_input: torch.Tensor | None, convs: Sequence[str] | None, max_rate: float, order: str,
             ignore: Sequence[str] | str | None) -> _Search:
    """Check the search options and find the groups a budget search may prune."""
    if order not in ORDERS:
        raise HRankError(f"unknown budget order {order!r}; choose {', '.join(ORDERS)}")
    if not 0 < max_rate < 1:
        raise HRankError(f"max_rate must be in (0, 1), got {max_rate}")
    if getattr(model, "hrank_plan", None) is not None:
        raise HRankError("this model is already pruned; find a budget on the unpruned model")
    arch = getattr(model, "hrank_arch", None)
    if input_size is None:
        if example_input is not None:
            input_size = tuple(example_input.shape[1:])
        elif arch is not None:
            input_size = models.get_spec(arch).input_size
        else:
            raise HRankError("pass input_size or example_input for a model outside the hrank registry")
    if example_input is None:
        p = next(model.parameters())
        example_input = torch.zeros(1, *input_size, device=p.device)
    raw = getattr(scores, "scores", scores)
    allowed = _candidates(model, raw, convs)
    graph = build_dependency_graph(model, example_input)
    groups = verify_groups(model, find_groups(model, example_input, graph=graph), example_input)
    ignored = Spec({}).without(model, ignore).ignored if ignore else frozenset()
    prunable: list[Group] = [g for g in groups if g.prunable and any(m in allowed and m in raw for m in g.members)
                             and not ignored.intersection(g.members)]
    if not prunable:
        raise HRankError("no prunable layers with scores: nothing to search over")
    limits = [min(g.channels - 1, math.floor(max_rate * g.channels)) for g in prunable]
    return _Search(tuple(input_size), example_input, raw, allowed, graph, groups, prunable, limits, ignore)


def find_budget(model: nn.Module, scores: Mapping[str, np.ndarray] | object, *, target: float | str,
                metric: str = "macs", input_size: tuple[int, ...] | None = None,
                example_input: torch.Tensor | None = None, convs: Sequence[str] | None = None,
                max_rate: float = 0.9, tolerance: float = TOLERANCE, order: str = ORDER_DEFAULT,
                round_to: int = ROUND_TO_DEFAULT, progress: Callable[[str], None] | None = None,
                ignore: Sequence[str] | str | None = None) -> BudgetResult:
    """Rates whose physically pruned network has ``target`` MACs (or params), within ``tolerance``.

    ``target`` below or equal to 1 is a fraction of the unpruned count, above 1 an absolute count.
    ``scores`` (a Ranks or a conv -> scores mapping) decide which filters go inside each group; only
    groups with a scored member among ``convs`` (default: the official prunable convs for registry
    models, every scored conv otherwise) are pruned, each by at most ``max_rate`` of its channels.
    ``order`` is the sequence in which groups give up channels while the search tightens (see ``ORDERS``).
    ``round_to`` > 1 keeps every pruned group's width a multiple of it (convolution kernels run channel counts
    such as 16 -> 11 at a fraction of their speed); when no such widths reach the target, single channels are used.
    A target that cannot be met is a one-line error naming the closest achievable count. ``ignore``: conv
    names or glob patterns left alone, with every group they are coupled into (as :meth:`Spec.without`).
    """
    if metric not in ("macs", "params"):
        raise HRankError(f"unknown budget metric {metric!r}; choose macs or params")
    if not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1:
        raise HRankError(f"round_to must be a positive integer, got {round_to!r}")
    search = _prepare(model, scores, input_size=input_size, example_input=example_input, convs=convs,
                      max_rate=max_rate, order=order, ignore=ignore)
    input_size, raw, graph, prunable = search.input_size, search.raw, search.graph, search.prunable
    base = flops.count(model, input_size)
    baseline = float(base.macs if metric == "macs" else base.params)
    goal = parse_target(target)
    goal = goal * baseline if goal <= 1 else goal
    if goal > baseline:
        raise HRankError(f"target {flops.format_count(goal)} {metric} exceeds the unpruned model's "
                         f"{flops.format_count(baseline)}")
    cost = _CostModel(model, graph, prunable, input_size)
    which = 0 if metric == "macs" else 1
    limits = search.limits

    def value(counts: list[int]) -> float:
        return float(cost(counts)[which])

    floor = value(limits)
    if floor > goal * (1 + tolerance):
        raise HRankError(f"target {flops.format_count(goal)} {metric} cannot be met with max_rate {max_rate:g}; "
                         f"the closest achievable is {flops.format_count(floor)} "
                         f"({floor / baseline:.1%} of {flops.format_count(baseline)})")
    ratios = cost.params_per_mac()
    counts, predicted, used, used_order = [0] * len(prunable), baseline, 1, order
    for step in dict.fromkeys((round_to, 1)):  # whole multiples first; single channels if they cannot reach it
        if abs(predicted - goal) <= tolerance * goal:
            break
        if step != round_to and progress:
            progress(f"widths in multiples of {round_to} cannot get within {tolerance:.0%} of the target; "
                     f"rounding dropped")
        step_limits = [max(_steps(g.channels, lim, step, g.blocks), default=0)
                       for g, lim in zip(prunable, limits, strict=True)]
        for other in (order, *[o for o in ORDERS if o != order]):  # an order too coarse: fall back to the others
            if abs(predicted - goal) <= tolerance * goal:
                break
            alt, alt_value = _search(prunable, raw, step_limits, other, value, goal, tolerance, step,
                                     params_per_mac=ratios)
            if abs(alt_value - goal) < abs(predicted - goal):
                counts, predicted, used, used_order = alt, alt_value, step, other
                if progress and other != order and abs(predicted - goal) <= tolerance * goal:
                    progress(f"order {order!r} cannot get within {tolerance:.0%} of the target; used {other!r}")
    if abs(predicted - goal) > tolerance * goal:
        raise HRankError(f"no rates within {tolerance:.0%} of {flops.format_count(goal)} {metric}; the closest "
                         f"is {flops.format_count(predicted)}")
    spec, pruned = search.prune(model, counts)
    real = flops.count(pruned, input_size)
    achieved = float(real.macs if metric == "macs" else real.params)
    if progress:
        progress(f"{sum(counts)} filters removed: {flops.format_count(achieved)} {metric} "
                 f"({achieved / baseline:.1%} of the unpruned model)")
    if (real.macs, real.params) != cost(counts):  # the model must agree with the real network
        raise HRankError(f"internal: the cost model predicted {cost(counts)} but the pruned network counts "
                         f"({real.macs}, {real.params}); please report this model")
    return BudgetResult(spec, metric, goal, achieved, baseline, real.macs, real.params, 1,
                        {g.members[0]: n for g, n in zip(prunable, counts, strict=True)}, used, used_order)
