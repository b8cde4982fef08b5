"""Plans: which output channels of each conv survive, one kept set per coupled group.

Scores (HRank ranks, or any criterion's per-filter scores: higher = more important) + a :class:`Spec` ->
a :class:`Plan`, plain JSON a person can review and diff. Channel indices in a plan always refer to the
*unpruned* model; translating them to a shrinking model is the applier's job (:mod:`hrank.prune`).

Coupled groups. Convs whose output channels must be removed together form a group: the producers of a
residual stream (they are added), a conv and the depthwise conv that reads it. A concatenation is not a
coupling: DenseNet layers and inception branches each keep their own channels, and the consumers' input
channels follow them. Groups are found by tracing the model with Torch-Pruning's ``DependencyGraph`` —
for any CNN, not only the registered ones — with a customized pruner for the option-A shortcut
(:class:`~hrank.models.base.ChannelPadShortcut`) so that the three stage streams of a CIFAR ResNet stay
separate groups (Torch-Pruning alone would merge them, see docs/pruning.md).

Selection. A group's score per channel is the mean of its members' scores; its rate comes from its
members' rates by a width rule (default: their mean); the ``int(rate * C)`` lowest-scored channels go.
Ties are broken by a stable sort: among equal scores the lower channel index is pruned first.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn

from hrank import __version__, models
from hrank.errors import HRankError
from hrank.io import atomic_write_json
from hrank.models.base import ChannelPadShortcut
from hrank.spec import Spec, num_pruned

__all__ = ["Group", "Plan", "PlanGroup", "WIDTH_RULES", "build_dependency_graph", "default_example_input",
           "find_groups", "make_plan", "select_kept", "ShortcutPruner"]

PLAN_FORMAT = "hrank.plan"
PLAN_VERSION = 1


# --------------------------------------------------------------------------------------------------------
# Dependency graph (Torch-Pruning) with the option-A shortcut handled
# --------------------------------------------------------------------------------------------------------

class ShortcutPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for :class:`ChannelPadShortcut`: input and output are pruned independently.

    ``prune_in_channels`` differs from ``prune_out_channels``, so Torch-Pruning adds no dependency through
    the module: the stream before a stage transition and the stream after it stay separate groups. Each
    side rewrites the shortcut's channel map (kept input channel -> kept output position).
    """

    TARGET_MODULES = (ChannelPadShortcut,)

    def prune_out_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> ChannelPadShortcut:
        drop = set(int(i) for i in idxs)
        position = {c: i for i, c in enumerate(c for c in range(layer.out_channels) if c not in drop)}
        pairs = [(s, position[d]) for s, d in zip(layer.src.tolist(), layer.dst.tolist(), strict=True)
                 if d in position]
        layer.set_mapping(layer.in_channels, len(position), [s for s, _ in pairs], [d for _, d in pairs])
        return layer

    def prune_in_channels(self, layer: ChannelPadShortcut, idxs: Sequence[int]) -> ChannelPadShortcut:
        drop = set(int(i) for i in idxs)
        position = {c: i for i, c in enumerate(c for c in range(layer.in_channels) if c not in drop)}
        pairs = [(position[s], d) for s, d in zip(layer.src.tolist(), layer.dst.tolist(), strict=True)
                 if s in position]
        layer.set_mapping(len(position), layer.out_channels, [s for s, _ in pairs], [d for _, d in pairs])
        return layer

    def get_out_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: ChannelPadShortcut) -> int:
        return layer.in_channels


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A zero batch of one image at the registry's input size (registered models only)."""
    arch = getattr(model, "hrank_arch", None)
    if arch is None:
        raise HRankError("pass example_input (one input batch) for a model outside the hrank registry")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(1, *models.get_spec(arch).input_size, device=device)


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> tp.DependencyGraph:
    """Trace ``model`` with Torch-Pruning (grad on, model mode restored afterwards); errors become one line."""
    x = default_example_input(model) if example_input is None else example_input
    if x.is_floating_point() and not any(p.requires_grad for p in model.parameters()):
        x = x.detach().clone().requires_grad_(True)  # a frozen model still builds an autograd graph
    was_training = model.training
    try:
        with torch.enable_grad():
            return tp.DependencyGraph().build_dependency(
                model, example_inputs=x, customized_pruners={ChannelPadShortcut: ShortcutPruner()}, verbose=False)
    except HRankError:
        raise
    except Exception as e:
        raise HRankError(f"cannot trace the model for dependency analysis ({_first_line(e)}); "
                         f"check that example_input fits the model") from None
    finally:
        model.train(was_training)  # build_dependency calls eval() and leaves it so


@dataclass(frozen=True)
class Group:
    """Convs whose output channels are coupled (one kept set), their width, and whether hrank can prune them."""

    members: tuple[str, ...]
    channels: int
    prunable: bool = True
    reason: str = ""


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        names.setdefault(m, name)
    return names


def _group_of(graph: tp.DependencyGraph, conv: nn.Conv2d, idxs: Sequence[int]):
    try:
        return graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(idxs))
    except Exception as e:
        raise HRankError(f"dependency analysis failed ({_first_line(e)})") from None


def _describe_group(graph: tp.DependencyGraph, conv: nn.Conv2d, names: dict[nn.Module, str],
                    order: Callable[[str], int]) -> Group:
    """Members and prunability of the group rooted at ``conv`` (all its channels)."""
    group = _group_of(graph, conv, range(conv.out_channels))
    members: list[nn.Conv2d] = []
    reasons: list[str] = []
    for item in group:
        target, handler = item.dep.target, item.dep.handler
        module = target.module
        if target.type == tp.ops.OPTYPE.OUTPUT or (not target.outputs and graph.is_out_channel_pruning_fn(handler)):
            reasons.append("its channels are an output of the network")
        if not isinstance(module, nn.Module):
            continue
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.Conv2d):
            reasons.append(f"{names.get(module, '?')} is a {type(module).__name__} (only Conv2d is supported)")
            continue
        if not isinstance(module, nn.Conv2d):
            continue
        if graph.is_out_channel_pruning_fn(handler):
            if module not in members:
                members.append(module)
            if list(item.idxs) != list(item.root_idxs):
                reasons.append(f"{names.get(module, '?')} reaches the group through a channel re-mapping")
        elif module.groups > 1 and not (module.groups == module.in_channels == module.out_channels):
            reasons.append(f"grouped conv {names.get(module, '?')} (groups={module.groups}) reads these channels")
    member_names = sorted((names[m] for m in members), key=order)
    widths = {m.out_channels for m in members}
    if len(widths) > 1:
        listing = ", ".join(f"{names[m]} ({m.out_channels})" for m in members[:4])
        reasons.append(f"convs of different widths were found coupled ({listing}); a channel-changing op that "
                       f"the tracer cannot see (e.g. F.pad on channels, an option-A shortcut written as a "
                       f"lambda) is the usual cause: use hrank.models.ChannelPadShortcut")
    return Group(tuple(member_names), conv.out_channels, not reasons, "; ".join(dict.fromkeys(reasons)))


def _order_key(model: nn.Module) -> Callable[[str], int]:
    """Sort key: a module name's position in ``named_modules`` (registration order)."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda name: position.get(name, len(position))


def find_groups(model: nn.Module, example_input: torch.Tensor | None = None, *,
                graph: tp.DependencyGraph | None = None) -> list[Group]:
    """All coupled groups of the model's Conv2d output channels, in module order.

    Every Conv2d that runs in the forward pass belongs to exactly one group (most are alone). A group is
    marked not prunable (with the reason) when its channels reach the network output, pass through a
    grouped (non-depthwise) conv, or couple convs of different widths (a tracing failure).
    """
    graph = graph if graph is not None else build_dependency_graph(model, example_input)
    names = _module_names(model)
    order = _order_key(model)
    assigned: set[str] = set()
    groups = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or name in assigned or m not in graph.module2node:
            continue
        g = _describe_group(graph, m, names, order)
        if name not in g.members:  # defensive: the root must be one of its own members
            g = Group((name,) + g.members, g.channels, False, g.reason or "root missing from its group")
        assigned.update(g.members)
        groups.append(g)
    return groups


# --------------------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------------------

def _mean_rate(rates: Sequence[float]) -> float:
    if all(r == rates[0] for r in rates):
        return float(rates[0])  # exact: a group whose members agree prunes exactly like each member
    return math.fsum(rates) / len(rates)


WIDTH_RULES = {
    "mean": _mean_rate,  # default: the group prunes the average of what its members ask for
    "max": lambda rates: float(max(rates)),  # prune as much as the most aggressive member
    "min": lambda rates: float(min(rates)),  # prune as little as the most conservative member
}


def select_kept(scores: np.ndarray, n_pruned: int) -> list[int]:
    """HRank's rule with a deterministic tie-break: drop the ``n_pruned`` lowest scores (stable sort:
    among equal scores the lower index goes first); return the kept indices, ascending."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")
    return sorted(int(i) for i in order[n_pruned:])


@dataclass
class PlanGroup:
    """One coupled group in a plan: its convs, unpruned width, rate from the width rule, kept channels."""

    members: list[str]
    channels: int
    rate: float
    kept: list[int]

    @property
    def width(self) -> int:
        return len(self.kept)

    def to_json(self) -> dict:
        return {"members": list(self.members), "channels": self.channels, "rate": self.rate,
                "width": self.width, "kept": list(self.kept)}

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> PlanGroup:
        return PlanGroup([str(m) for m in d["members"]], int(d["channels"]), float(d["rate"]),
                         [int(i) for i in d["kept"]])


@dataclass
class Plan:
    """Kept output channels per conv (indices into the *unpruned* conv), grouped by coupling; JSON-ready.

    ``coupling`` is ``"groups"`` (dependency-consistent; physical or mask) or ``"independent"`` (each conv
    alone, as HRank's masks; mask mode only).
    """

    arch: str | None
    num_classes: int | None
    input_size: list[int]
    criterion: str
    coupling: str
    width_rule: str
    spec: dict
    groups: list[PlanGroup]
    scores_fingerprint: str | None = None
    scores_digest: str | None = None
    hrank_version: str = __version__
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> dict[str, list[int]]:
        """conv name -> kept output channel indices (into the unpruned conv)."""
        return {m: list(g.kept) for g in self.groups for m in g.members}

    @property
    def channels(self) -> dict[str, int]:
        """conv name -> unpruned output channels."""
        return {m: g.channels for g in self.groups for m in g.members}

    def pruned_groups(self) -> list[PlanGroup]:
        """Groups that lose at least one channel."""
        return [g for g in self.groups if g.width < g.channels]

    def to_json(self) -> dict:
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION, "hrank_version": self.hrank_version,
            "arch": self.arch, "num_classes": self.num_classes, "input_size": list(self.input_size),
            "criterion": self.criterion, "coupling": self.coupling, "width_rule": self.width_rule,
            "scores_fingerprint": self.scores_fingerprint, "scores_digest": self.scores_digest,
            "spec": self.spec, "meta": self.meta,
            "groups": [g.to_json() for g in self.groups],
            "layers": self.layers,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or d.get("format") != PLAN_FORMAT:
            raise HRankError("not an hrank plan (missing format: hrank.plan)")
        if int(d.get("version", 0)) > PLAN_VERSION:
            raise HRankError(f"plan format version {d.get('version')} is newer than this hrank supports "
                             f"({PLAN_VERSION})")
        try:
            plan = Plan(d.get("arch"), d.get("num_classes"), [int(x) for x in d["input_size"]],
                        str(d.get("criterion", "hrank")), str(d["coupling"]), str(d.get("width_rule", "mean")),
                        dict(d.get("spec") or {}), [PlanGroup.from_json(g) for g in d["groups"]],
                        d.get("scores_fingerprint"), d.get("scores_digest"),
                        str(d.get("hrank_version", "")), dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError) as e:
            raise HRankError(f"malformed plan: {_first_line(e)}") from None
        if plan.coupling not in ("groups", "independent"):
            raise HRankError(f"malformed plan: unknown coupling {plan.coupling!r}")
        for g in plan.groups:
            if len(set(g.kept)) != len(g.kept) or any(not 0 <= i < g.channels for i in g.kept) or not g.kept:
                raise HRankError(f"malformed plan: group {g.members[0]} keeps invalid channels")
        return plan

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan as indented JSON (atomic)."""
        return atomic_write_json(path, self.to_json())

    @staticmethod
    def load(path: str | os.PathLike) -> Plan:
        """Read a plan JSON file."""
        path = Path(path)
        if not path.is_file():
            raise HRankError(f"plan file not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise HRankError(f"cannot read plan {path}: {_first_line(e)}") from None
        return Plan.from_json(data)

    def summary(self) -> str:
        """One line: coupling, groups pruned, channels kept."""
        total = sum(g.channels * len(g.members) for g in self.groups)
        kept = sum(g.width * len(g.members) for g in self.groups)
        return (f"{self.coupling} plan for {self.arch or 'a custom model'}: {len(self.pruned_groups())} of "
                f"{len(self.groups)} groups pruned, {kept}/{total} conv filters kept")


def _unpack_scores(scores_or_ranks: Any) -> tuple[dict[str, np.ndarray], str | None, str | None]:
    """(scores, fingerprint, arch) from a Ranks-like object or a plain mapping of arrays."""
    scores = getattr(scores_or_ranks, "scores", None)
    if scores is not None:
        return dict(scores), getattr(scores_or_ranks, "fingerprint", None), getattr(scores_or_ranks, "arch", None)
    if isinstance(scores_or_ranks, Mapping):
        return dict(scores_or_ranks), None, None
    raise HRankError(f"expected Ranks or a mapping of conv name -> scores, got {type(scores_or_ranks).__name__}")


def _scores_digest(scores: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(scores):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(scores[name], dtype=np.float64).tobytes())
    return "sha256:" + h.hexdigest()[:16]


def _checked_scores(raw: Mapping[str, Any], channels: Mapping[str, int], label: str) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, value in raw.items():
        if name not in channels:
            raise HRankError(f"scores name layer {name!r}, which {label} does not have (scores for another model?)")
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
        if arr.shape[0] != channels[name]:
            raise HRankError(f"scores for {name} have {arr.shape[0]} values but the conv has {channels[name]} "
                             f"filters (scores for another model?)")
        if not np.all(np.isfinite(arr)):
            raise HRankError(f"scores for {name} contain NaN or infinite values")
        out[name] = arr
    return out


def _select_for_group(members: Sequence[str], channels: int, rate: float, scores: Mapping[str, np.ndarray],
                      what: str) -> list[int]:
    n = num_pruned(rate, channels)
    if n >= channels:
        raise HRankError(f"{what} would lose all {channels} channels (rate {rate:g}); lower the rates")
    if n == 0:
        return list(range(channels))
    scored = [scores[m] for m in members if m in scores]
    if not scored:
        raise HRankError(f"no scores for {what} (rate {rate:g} needs scores for at least one of "
                         f"{', '.join(members[:4])})")
    return select_kept(np.mean(np.stack(scored), axis=0), n)


def make_plan(model: nn.Module, scores_or_ranks: Any, spec: Spec | str | Mapping[str, float], *,
              criterion: str = "hrank", coupling: str = "groups", width_rule: str = "mean",
              example_input: torch.Tensor | None = None, groups: Sequence[Group] | None = None) -> Plan:
    """Choose kept output channels for every conv the spec names (and the convs coupled with them).

    ``scores_or_ranks``: a ``Ranks`` (``.scores``, ``.fingerprint``, ``.arch``) or a mapping conv name ->
    per-filter scores (higher = keep). ``coupling="groups"`` gives one kept set per coupled group, by the
    mean of its members' scores, with the group's rate from ``width_rule`` over the rates its members have
    in the spec (members the spec does not name do not vote). ``coupling="independent"`` selects every
    conv alone, as HRank's masks do; such a plan is only valid in mask mode. The model is not modified.
    """
    if coupling not in ("groups", "independent"):
        raise HRankError(f"unknown coupling {coupling!r}; choose groups or independent")
    if width_rule not in WIDTH_RULES:
        raise HRankError(f"unknown width rule {width_rule!r}; choose one of {', '.join(WIDTH_RULES)}")
    if getattr(model, "hrank_plan", None) is not None:
        raise HRankError("this model is already pruned (it carries a plan); plan on the unpruned model")
    arch = getattr(model, "hrank_arch", None)
    label = arch or type(model).__name__
    raw_scores, fingerprint, scores_arch = _unpack_scores(scores_or_ranks)
    if scores_arch and arch and scores_arch != arch:
        raise HRankError(f"the ranks are for {scores_arch}, but the model is {arch}")
    spec = Spec.from_any(model, spec)
    if spec.arch and arch and spec.arch != arch:
        raise HRankError(f"the spec is for {spec.arch}, but the model is {arch}")
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    channels = {n: m.out_channels for n, m in convs.items()}
    for conv in spec.rates:
        if conv not in channels:
            raise HRankError(f"spec names layer {conv!r}, which {label} does not have")
    scores = _checked_scores(raw_scores, channels, label)
    x = default_example_input(model) if example_input is None else example_input

    plan_groups: list[PlanGroup] = []
    if coupling == "independent":
        order = _order_key(model)
        for conv in sorted(spec.rates, key=order):
            rate = spec.rates[conv]
            kept = _select_for_group([conv], channels[conv], rate, scores, f"layer {conv}")
            plan_groups.append(PlanGroup([conv], channels[conv], rate, kept))
    else:
        found = list(groups) if groups is not None else find_groups(model, x)
        covered = {m for g in found for m in g.members}
        for conv in spec.rates:
            if conv not in covered:
                raise HRankError(f"layer {conv} does not run in the forward pass of {label}; it cannot be pruned")
        rule = WIDTH_RULES[width_rule]
        for g in found:
            rated = [spec.rates[m] for m in g.members if m in spec.rates]
            if not rated:
                continue
            rate = rule(rated)
            what = f"group {g.members[0]}" + (f" (+{len(g.members) - 1} coupled)" if len(g.members) > 1 else "")
            if not g.prunable:
                if num_pruned(rate, g.channels) > 0:
                    raise HRankError(f"cannot prune {what}: {g.reason}")
                plan_groups.append(PlanGroup(list(g.members), g.channels, rate, list(range(g.channels))))
                continue
            kept = _select_for_group(g.members, g.channels, rate, scores, what)
            plan_groups.append(PlanGroup(list(g.members), g.channels, rate, kept))

    num_classes = None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        num_classes = linears[-1].out_features
    used = {m for g in plan_groups for m in g.members if m in scores}
    return Plan(arch, num_classes, list(x.shape[1:]), criterion, coupling, width_rule, spec.to_json(), plan_groups,
                fingerprint, _scores_digest({k: scores[k] for k in used}))
