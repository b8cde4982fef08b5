"""Apply a plan: physically (a real, smaller network) or as HRank's 0/1 masks; re-estimate BN statistics.

Physical mode removes channels through Torch-Pruning's dependency graph, one coupled group at a time:
conv, BN and linear weights are sliced, with every consumer's input channels, and the option-A shortcut's
channel map is rewritten (:class:`hrank.plan.ShortcutPruner`); grouped convs keep each filter's own input
block. A forward check compares the real widths with the plan, and the invariant check compares the
outputs with the mask-mode network on a random batch (docs/pruning.md). The result is an ordinary
``nn.Module``; ``model.hrank_plan`` and ``model.hrank_mode`` record how it was made, and :func:`hrank.save`
stores it without pickling modules.

Mask mode keeps every shape. A coupled plan zeroes everything the physical prune removes (producers'
parameters, consumers' input columns; LayerNorms renormalize over kept channels); an independent plan zeroes,
as HRank's code, each conv's filters and the BNs that carry them (in DenseNet every BN that reads the
concatenated channel). :func:`enforce_masks` re-applies the masks after each optimizer step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from hrank import flops, models
from hrank.errors import HRankError
from hrank.io import _error_line
from hrank.layers import HRANK_TENSOR_PREFIX, is_conv, is_grouped, per_filter_extras
from hrank.modelcopy import copy_model
from hrank.models.base import ChannelPadShortcut
from hrank.plan import Plan, PlanGroup, _called, _in_training, _require_tensor, build_dependency_graph, find_groups
from hrank.spec import Spec

__all__ = ["apply_plan", "enforce_masks", "recalibrate_bn", "hrank_rule_counts", "layer_widths", "MODES"]

MODES = ("physical", "mask")
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _example_input(model: nn.Module, plan: Plan, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        _require_tensor(example_input)
        return example_input
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, *plan.input_size, device=device, dtype=dtype)


def _check_fits(model: nn.Module, plan: Plan, mode: str) -> dict[str, nn.Module]:
    """The plan must be for this (unpruned) model: same arch, every planned conv present at full width."""
    if mode not in MODES:
        raise HRankError(f"unknown mode {mode!r}; choose physical or mask")
    if getattr(model, "hrank_plan", None) is not None:
        raise HRankError("this model is already pruned (it carries a plan); start from the unpruned model")
    arch = getattr(model, "hrank_arch", None)
    if plan.arch and arch and plan.arch != arch:
        raise HRankError(f"the plan is for {plan.arch}, but the model is {arch}")
    modules = dict(model.named_modules())
    convs = {}
    for name, channels in plan.channels.items():
        m = modules.get(name)
        if not is_conv(m):
            raise HRankError(f"the plan names conv {name!r}, which this model does not have (plan for another model?)")
        if m.out_channels != channels:
            raise HRankError(f"the plan expects {channels} filters in {name}, the model has {m.out_channels} "
                             f"(plan for another model, or a model that is already pruned?)")
        convs[name] = m
    if mode == "physical" and plan.coupling == "independent":
        raise HRankError("an independent plan (a kept set per conv, ignoring coupling) is only valid in mask "
                         "mode; make a coupled plan for physical pruning")
    return convs


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    if out is None or isinstance(out, (bool, int, float, str)):
        return []
    raise HRankError(f"the model returns an object of type {type(out).__name__}, which hrank cannot compare "
                     f"before and after pruning; return tensors (alone or in a tuple, list or dict)")


def _outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (tensors nested in tuples, lists, dicts); at least one, and no
    objects hrank cannot look into, so that the invariant check never passes on nothing."""
    tensors = _tensors(out)
    if not tensors:
        raise HRankError(f"the model's output ({type(out).__name__}) holds no tensor, so pruning cannot be "
                         f"checked; return tensors (alone or in a tuple, list or dict)")
    return tensors


def _output_shape(model: nn.Module, x: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    with torch.no_grad():
        return tuple(tuple(t.shape) for t in _outputs(model(x)))


class _ForwardFailure(HRankError):
    """The pruned model could not run (a channel count the trace cannot see, e.g. read from another tensor's
    shape); :func:`apply_plan` adds the group that breaks it."""


def _forward_check(model: nn.Module, plan: Plan, x: torch.Tensor, expected_out: tuple) -> None:
    """Run the pruned model once; every planned conv must produce exactly its planned width."""
    modules = dict(model.named_modules())
    seen: dict[str, int] = {}
    hooks = [modules[name].register_forward_hook(
        lambda mod, inp, out, name=name: seen.__setitem__(name, int(out.shape[1])))
        for name in plan.layers]
    try:
        shape = _output_shape(model, x)
    except Exception as e:
        raise _ForwardFailure(f"the pruned model fails its forward check ({_error_line(e)})") from None
    finally:
        for h in hooks:
            h.remove()
    if shape != expected_out:
        raise HRankError(f"the pruned model's output shape {shape} differs from the original {expected_out}")
    for name, kept in plan.layers.items():
        width = modules[name].out_channels
        if seen.get(name, width) != len(kept) or width != len(kept):
            raise HRankError(f"forward check: {name} has {seen.get(name, width)} output channels, the plan "
                             f"keeps {len(kept)}")


def _train_check(model: nn.Module, x: torch.Tensor) -> None:
    """The pruned model must still run in training mode (it has layers that run only there); nothing in
    the model changes (BatchNorm statistics and the RNG state are restored)."""
    try:
        _in_training(lambda batch: _called(model, batch, True), x)
    except Exception as e:
        raise HRankError(f"the pruned model fails in training mode ({_error_line(e)}): a layer that runs only "
                         f"in training (an auxiliary head?) reads pruned channels; ignore the convs it reads") \
            from None


def _grouped_in_weight(weight: torch.Tensor, groups: int, drop: Sequence[int],
                       drop_out: Sequence[int] = ()) -> torch.Tensor:
    """A grouped conv's weight (out, in/g, kh, kw) without the input channels ``drop`` (indices into the
    conv's input) and the filters ``drop_out`` (when the same group also removes its outputs, as in a
    residual stream it reads and writes): each output row keeps the columns of its own input block.
    Torch-Pruning 1.6.1 slices the same columns from every row, which is right only when every block
    loses the same positions."""
    out, per = weight.shape[0], weight.shape[1]
    dropped = set(int(i) for i in drop)
    keep = [[p for p in range(per) if b * per + p not in dropped] for b in range(groups)]
    if len({len(k) for k in keep}) != 1:
        raise HRankError(f"a grouped conv (groups={groups}) would keep unequal input channels per group")
    gone = set(int(i) for i in drop_out)
    kept_rows = [o for o in range(out) if o not in gone]
    rows = torch.tensor([keep[o // (out // groups)] for o in kept_rows], dtype=torch.long, device=weight.device)
    index = rows[:, :, None, None].expand(-1, -1, weight.shape[2], weight.shape[3])
    picked = weight.detach().index_select(0, torch.tensor(kept_rows, dtype=torch.long, device=weight.device))
    return torch.gather(picked, 1, index)


def _verify_groups(model: nn.Module, plan: Plan, graph: tp.DependencyGraph) -> None:
    """Every group a coupled plan prunes is a group of this model, prunable, with the same blocks."""
    found = {m: g for g in find_groups(model, graph=graph) for m in g.members}
    for pg in plan.pruned_groups():
        g = found.get(pg.members[0])
        if g is None or set(g.members) != set(pg.members):
            have = ", ".join(g.members[:4]) if g is not None else "nothing"
            raise HRankError(f"the plan couples {', '.join(pg.members[:4])} but this model couples {have} "
                             f"(plan for another model?)")
        if not g.prunable:
            raise HRankError(f"cannot prune group {pg.members[0]}: {g.reason}")
        if g.blocks != pg.blocks:
            raise HRankError(f"the plan splits group {pg.members[0]} into {pg.blocks} blocks, this model into "
                             f"{g.blocks} (plan for another model?)")


def _slice_extras(conv: nn.Module, width: int, keep: list[int]) -> None:
    """Keep the ``keep`` filters' entries of a conv subclass's per-filter tensors (``width`` before pruning)."""
    index = torch.tensor(keep, dtype=torch.long)
    for name, t in per_filter_extras(conv, width).items():
        kept = t.detach().index_select(0, index.to(t.device)).clone()
        if isinstance(t, nn.Parameter):
            setattr(conv, name, nn.Parameter(kept, requires_grad=t.requires_grad))
        else:
            conv._buffers[name] = kept


def _apply_physical(model: nn.Module, plan: Plan, graph: tp.DependencyGraph, convs: dict[str, nn.Module]) -> None:
    _verify_groups(model, plan, graph)
    present = {name: list(range(conv.out_channels)) for name, conv in convs.items()}
    for pg in plan.pruned_groups():
        root = pg.members[0]
        kept = set(pg.kept)
        # plan indices refer to the unpruned conv; translate them to the conv's current positions
        positions = [i for i, c in enumerate(present[root]) if c not in kept]
        try:
            group = graph.get_pruning_group(convs[root], tp.prune_conv_out_channels, positions)
            # grouped convs' weights before Torch-Pruning slices them: the inputs each loses, and its filters
            # when the same group removes its outputs too (a residual stream it reads and writes)
            grouped_inputs: list[tuple[nn.Module, torch.Tensor, list[int]]] = []
            grouped_outputs: dict[nn.Module, list[int]] = {}
            extras: dict[nn.Module, tuple[int, set[int]]] = {}  # conv -> (its width now, filters it loses)
            for item in group:
                module = item.dep.target.module
                out_side = graph.is_out_channel_pruning_fn(item.dep.handler)
                if out_side and per_filter_extras(module):
                    extras.setdefault(module, (module.out_channels, set()))[1].update(int(i) for i in item.idxs)
                if not is_grouped(module):
                    continue
                if out_side:
                    grouped_outputs.setdefault(module, []).extend(int(i) for i in item.idxs)
                else:
                    grouped_inputs.append((module, module.weight, list(item.idxs)))
            group.prune()
            for conv, weight, drop in grouped_inputs:
                conv.weight = nn.Parameter(_grouped_in_weight(weight, conv.groups, drop, grouped_outputs.get(conv, ())),
                                           requires_grad=weight.requires_grad)
            for conv, (width, drop) in extras.items():
                _slice_extras(conv, width, [i for i in range(width) if i not in drop])
        except HRankError:
            raise
        except Exception as e:
            raise HRankError(f"Torch-Pruning failed while removing channels of {root} ({_error_line(e)})") from None
        for m in pg.members:
            present[m] = [c for c in present[m] if c in kept]


# --------------------------------------------------------------------------------------------------------
# Masks: what to zero, by module name, so the same masks apply to the model and to a copy of it
# --------------------------------------------------------------------------------------------------------

def _first_norms(graph: tp.DependencyGraph, conv: nn.Module) -> set[nn.Module]:
    """Normalization layers that read ``conv``'s channels before any other conv/linear or residual add.

    That is the conv's own BN, and in DenseNet every BN downstream in the concatenation (the official
    co-masking); the walk stops at multi-input element-wise ops so a residual stream's other BNs are left.
    """
    start = graph.module2node[conv]
    stack, seen, norms = list(start.outputs), set(), set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = node.module
        if isinstance(module, _BN_TYPES):
            norms.add(module)
            continue
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) or node.type == tp.ops.OPTYPE.OUTPUT:
            continue
        if node.type == tp.ops.OPTYPE.ELEMENTWISE and len(node.inputs) > 1:
            continue
        stack.extend(node.outputs)
    return norms


@dataclass(frozen=True)
class _Mask:
    """Zero ``param`` of module ``owner`` along ``dim`` at ``idxs`` (kind "dim"), the input columns ``idxs``
    of a grouped conv (kind "grouped_in"), or renormalize a LayerNorm over its kept channels (kind "ln")."""

    owner: str
    param: str
    kind: str
    idxs: tuple[int, ...]
    dim: int = 0


def _out_masks(module: Any, owner: str, param_name: str | None, handler: Any, idxs: list[int]) -> list[_Mask]:
    """Masks for a module (or unwrapped parameter) whose output channels ``idxs`` are pruned."""
    t = tuple(idxs)
    if isinstance(module, nn.Parameter):  # ``handler`` is the Torch-Pruning node's pruning dim here
        return [_Mask(owner, param_name or "", "dim", t, int(handler) % max(module.dim(), 1))]
    out: list[_Mask] = []
    if isinstance(module, nn.modules.conv._ConvNd):
        out.append(_Mask(owner, "weight", "dim", t, 1 if module.transposed else 0))
    elif isinstance(module, nn.LayerNorm):
        out.append(_Mask(owner, "", "ln", t))
        if module.weight is not None:
            out.append(_Mask(owner, "weight", "dim", t, 0))
    elif isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() >= 1 \
            and not (isinstance(module, nn.PReLU) and module.weight.numel() == 1):
        out.append(_Mask(owner, "weight", "dim", t, 0))  # norms, linears, per-channel PReLU
    if isinstance(getattr(module, "bias", None), torch.Tensor):
        out.append(_Mask(owner, "bias", "dim", t, 0))
    return out


def _in_masks(module: Any, owner: str, idxs: list[int]) -> list[_Mask]:
    """Masks for a module that reads the pruned channels ``idxs`` (its input columns)."""
    t = tuple(idxs)
    if isinstance(module, nn.modules.conv._ConvNd):
        if is_grouped(module):
            return [_Mask(owner, "weight", "grouped_in", t)]
        return [_Mask(owner, "weight", "dim", t, 0 if module.transposed else 1)]
    if isinstance(module, nn.Linear):
        return [_Mask(owner, "weight", "dim", t, 1)]
    if isinstance(module, ChannelPadShortcut):  # no weights: its input channels are zeroed before the copy
        return [_Mask(owner, "", "zero_in", t)]
    return []


def _mask_plan(model: nn.Module, plan: Plan, graph: tp.DependencyGraph, convs: dict[str, nn.Module]) -> list[_Mask]:
    """Every mask that makes the unpruned model compute what the physically pruned one computes.

    Coupled plans zero each pruned channel everywhere Torch-Pruning would remove it: the producers'
    parameters (convs, norms, linears, unwrapped parameters such as layer scales), the consumers' input
    columns, and LayerNorms renormalize over the kept channels. Independent plans (HRank's own masks) zero
    each conv's filters and its own BN only, as the official code does.
    """
    names = {m: n for n, m in model.named_modules()}
    param_names = getattr(graph, "_param_to_name", {})
    masks: list[_Mask] = []
    for pg in plan.pruned_groups():
        kept = set(pg.kept)
        pruned = [c for c in range(pg.channels) if c not in kept]
        for member in pg.members if plan.coupling == "independent" else pg.members[:1]:
            conv = convs[member]
            try:
                group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, pruned)
            except Exception as e:
                raise HRankError(f"dependency analysis failed for {member} ({_error_line(e)})") from None
            if plan.coupling == "independent":
                own = _first_norms(graph, conv)
                masks += _out_masks(conv, member, None, None, pruned)
                for item in group:
                    module = item.dep.target.module
                    if module in own and isinstance(module, _BN_TYPES) and module.affine \
                            and graph.is_out_channel_pruning_fn(item.dep.handler):
                        masks += _out_masks(module, names[module], None, None, list(item.idxs))
                continue
            for item in group:
                module, handler = item.dep.target.module, item.dep.handler
                idxs = list(item.idxs)
                if isinstance(module, nn.Parameter):
                    full = param_names.get(module)
                    if full is None:
                        continue
                    owner, _, pname = full.rpartition(".")
                    masks += _out_masks(module, owner, pname, getattr(item.dep.target, "pruning_dim", 0), idxs)
                elif not isinstance(module, nn.Module) or module not in names:
                    continue
                elif graph.is_out_channel_pruning_fn(handler):
                    masks += _out_masks(module, names[module], None, handler, idxs)
                else:
                    masks += _in_masks(module, names[module], idxs)
    return list(dict.fromkeys(masks))


# Non-persistent buffers mask mode registers (the trace and per_filter_extras skip them by their prefix):
_PARAM_MASK = f"{HRANK_TENSOR_PREFIX}mask__"  # on a module: a 0/1 tensor shaped like its parameter
_LN_KEEP = f"{HRANK_TENSOR_PREFIX}ln_keep"  # on a LayerNorm: 1 for kept channels
_IN_KEEP = f"{HRANK_TENSOR_PREFIX}in_keep"  # on a weightless consumer: 1 for input channels it still reads


def _zero_pruned_inputs(module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: zero the pruned input channels (dim 1) of a consumer without weights."""
    keep = getattr(module, _IN_KEEP, None)
    if keep is None or not args or not isinstance(args[0], torch.Tensor) or args[0].shape[1] != keep.numel():
        return None
    shape = [1, -1] + [1] * (args[0].dim() - 2)
    return (args[0] * keep.view(shape).to(args[0].dtype), *args[1:])


def _masked_layer_norm(module: nn.LayerNorm, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook: a LayerNorm computed over its kept channels only, zeros elsewhere (what the physically
    pruned LayerNorm computes). Channels are the last dim for nn.LayerNorm, dim 1 for NCHW subclasses."""
    keep = getattr(module, _LN_KEEP, None)
    x = args[0] if args else None
    if keep is None or not isinstance(x, torch.Tensor):
        return None
    dim = x.dim() - 1 if type(module).forward is nn.LayerNorm.forward else 1
    if x.shape[dim] != keep.numel():
        return None
    idx = keep.nonzero().flatten()
    xs = x.index_select(dim, idx).movedim(dim, -1)
    w = module.weight[idx] if module.weight is not None else None
    b = module.bias[idx] if module.bias is not None else None
    y = F.layer_norm(xs, (idx.numel(),), w, b, module.eps).movedim(-1, dim)
    return torch.zeros_like(output).index_copy(dim, idx, y.to(output.dtype))


def _install_masks(model: nn.Module, masks: Sequence[_Mask]) -> None:
    """Attach ``masks`` to ``model`` (found by module name) and zero what they cover."""
    modules = dict(model.named_modules())
    for mk in masks:
        owner = modules.get(mk.owner)
        if owner is None:
            raise HRankError(f"mask for {mk.owner!r}, which the model does not have")
        if mk.kind in ("ln", "zero_in"):
            name = _LN_KEEP if mk.kind == "ln" else _IN_KEEP
            keep = getattr(owner, name, None)
            if keep is None:
                width = owner.normalized_shape[-1] if mk.kind == "ln" else owner.in_channels
                device = next(iter([*owner.parameters(), *owner.buffers()]), torch.empty(0)).device
                keep = torch.ones(width, dtype=torch.bool, device=device)
                owner.register_buffer(name, keep, persistent=False)
                if mk.kind == "ln":
                    owner.register_forward_hook(_masked_layer_norm)
                else:
                    owner.register_forward_pre_hook(_zero_pruned_inputs)
            keep[list(mk.idxs)] = False
            continue
        param = getattr(owner, mk.param, None)
        if not isinstance(param, torch.Tensor):
            continue
        buffer = _PARAM_MASK + mk.param
        mask = getattr(owner, buffer, None)
        if mask is None:
            mask = torch.ones_like(param, memory_format=torch.contiguous_format).detach()
            owner.register_buffer(buffer, mask, persistent=False)
        if mk.kind == "dim":
            mask.index_fill_(mk.dim, torch.tensor(mk.idxs, dtype=torch.long, device=mask.device), 0)
        else:  # grouped_in: input channel c sits in block c // per, at column c % per, for that block's rows
            out, per, groups = mask.shape[0], mask.shape[1], owner.groups
            rows = out // groups
            for c in mk.idxs:
                b, col = divmod(c, per)
                mask[b * rows:(b + 1) * rows, col] = 0
    enforce_masks(model)


def _apply_masks(model: nn.Module, plan: Plan, graph: tp.DependencyGraph, convs: dict[str, nn.Module]) -> None:
    if plan.coupling != "independent":
        _verify_groups(model, plan, graph)
    _install_masks(model, _mask_plan(model, plan, graph, convs))


# --------------------------------------------------------------------------------------------------------
# The invariant (physical == mask) and all-or-nothing application
# --------------------------------------------------------------------------------------------------------

CHECK_TOLERANCE = 1e-4  # relative L2 difference allowed between the physical and the masked network


def _random_like(x: torch.Tensor) -> torch.Tensor:
    """A seeded random batch shaped like ``x`` (a zero example input would only exercise the biases)."""
    if not x.is_floating_point():
        return x
    g = torch.Generator().manual_seed(0)
    return torch.randn(x.shape, generator=g, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def _relative_difference(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    """The largest relative L2 difference over the output tensors, each against its own scale (so a small
    output computed wrongly is not hidden beside a large one that is right)."""
    with torch.no_grad():
        ya, yb = _outputs(a(x)), _outputs(b(x))
    if len(ya) != len(yb) or any(p.shape != q.shape for p, q in zip(ya, yb, strict=True)):
        return math.inf
    worst = 0.0
    for p, q in zip(ya, yb, strict=True):
        if not (p.is_floating_point() or p.is_complex()):
            if not torch.equal(p, q):
                return math.inf
            continue
        num = float((p.double() - q.double()).norm())
        den = float(q.double().norm())
        if not math.isfinite(num):
            return math.inf
        worst = max(worst, num / den if den > 0 else num)
    return worst


def _difference(pruned: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    """Relative output difference; in float32 first, confirmed in float64 when it exceeds the tolerance."""
    rel = _relative_difference(pruned.eval(), reference.eval(), x)
    if rel > CHECK_TOLERANCE and x.is_floating_point() and x.dtype != torch.float64:
        rel = _relative_difference(copy_model(pruned).double(), copy_model(reference).double(), x.double())
    return rel


class _Mismatch(Exception):
    def __init__(self, rel: float) -> None:
        super().__init__(f"relative difference {rel:.3g}")
        self.rel = rel


def _sub_plan(plan: Plan, keep: Sequence[PlanGroup]) -> Plan:
    """``plan`` with only the groups in ``keep`` pruned (the others whole)."""
    chosen = {id(g) for g in keep}
    groups = [g if id(g) in chosen else PlanGroup(list(g.members), g.channels, 0.0, list(range(g.channels)),
                                                  g.blocks) for g in plan.groups]
    return dataclasses.replace(plan, groups=groups)


def _mismatch(model: nn.Module, plan: Plan, x: torch.Tensor, *, strict: bool = False) -> float | None:
    """Physical vs mask difference of ``plan`` on a copy of ``model`` (for the diagnosis): inf when the pruned
    copy cannot run; with ``strict``, None when pruning fails for another reason (one no group explains,
    such as an output hrank cannot compare), else inf for that too."""
    trial = copy_model(model)
    try:
        _apply(trial, plan, "physical", x, _check_fits(trial, plan, "physical"), check=True)
    except _Mismatch as e:
        return e.rel
    except _ForwardFailure:
        return math.inf
    except HRankError:
        return None if strict else math.inf
    return 0.0


def _culprit(model: nn.Module, plan: Plan, x: torch.Tensor) -> PlanGroup | None:
    """The pruned group that breaks the invariant, by bisection over the pruned groups (None if not found)."""
    candidates = plan.pruned_groups()
    while len(candidates) > 1:
        half = candidates[: len(candidates) // 2]
        if _mismatch(model, _sub_plan(plan, half), x) > CHECK_TOLERANCE:
            candidates = half
        else:
            candidates = candidates[len(candidates) // 2:]
    if candidates and _mismatch(model, _sub_plan(plan, candidates), x) > CHECK_TOLERANCE:
        return candidates[0]
    return None


class _Snapshot:
    """Everything pruning may change in a model, to put it back exactly (same objects) on failure."""

    def __init__(self, model: nn.Module, values: bool) -> None:
        self.state = []
        for m in model.modules():
            attrs = dict(m.__dict__)
            dicts = {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}
            self.state.append((m, attrs, dicts))
        self.values = [(t, t.detach().clone()) for t in [*model.parameters(), *model.buffers()]] if values else []

    def restore(self) -> None:
        for m, attrs, dicts in self.state:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for k, saved in dicts.items():
                attrs[k].clear()
                attrs[k].update(saved)
        with torch.no_grad():
            for t, v in self.values:
                t.copy_(v)


def _apply(model: nn.Module, plan: Plan, mode: str, x: torch.Tensor, convs: dict[str, nn.Module],
           check: bool) -> None:
    """Prune in place; on any error (``_Mismatch`` included) the model is put back exactly as before."""
    modes = {m: m.training for m in model.modules()}
    snapshot = _Snapshot(model, values=mode == "mask")
    try:
        model.eval()
        graph = build_dependency_graph(model, x)
        if mode == "physical":
            expected_out = _output_shape(model, x)
            reference = None
            if check and plan.pruned_groups():
                reference = copy_model(model)
                _install_masks(reference, _mask_plan(model, plan, graph, convs))
            _apply_physical(model, plan, graph, convs)
            model.eval()
            _forward_check(model, plan, x, expected_out)
            if graph.hrank_train_only:
                _train_check(model, x)
            if reference is not None:
                rel = _difference(model, reference, _random_like(x))
                if not rel <= CHECK_TOLERANCE:
                    raise _Mismatch(rel)
        else:
            if check and plan.coupling != "independent" and plan.pruned_groups():
                # a coupled mask computes what the physical prune computes, so it must pass the same checks:
                # masks placed by a channel mapping that is wrong would otherwise zero the wrong columns silently
                trial = copy_model(model)
                _apply(trial, plan, "physical", x, _check_fits(trial, plan, "physical"), check=True)
            _apply_masks(model, plan, graph, convs)
    except BaseException:
        snapshot.restore()
        raise
    finally:
        for m, training in modes.items():
            m.training = training


def apply_plan(model: nn.Module, plan: Plan, *, mode: str = "physical",
               example_input: torch.Tensor | None = None, check: bool = True) -> nn.Module:
    """Prune ``model`` in place by ``plan`` and return it; sets ``model.hrank_plan`` and ``model.hrank_mode``.

    ``physical`` removes the channels (a smaller, faster network); ``mask`` zeroes them with 0/1 masks and
    keeps every shape (HRank's way; call :func:`enforce_masks` after each optimizer step). The model's
    train/eval modes are kept. Build optimizers after this call: physical pruning replaces parameters.

    All or nothing: on any error the model is exactly as before. With ``check`` (default), a physical
    prune is verified against the invariant: on a seeded random input shaped like ``example_input`` the
    pruned network must compute what the masked network computes (relative difference <= 1e-4), else a
    one-line error names the first group that breaks it.
    """
    convs = _check_fits(model, plan, mode)
    x = _example_input(model, plan, example_input)
    try:
        _apply(model, plan, mode, x, convs, check)
    except _ForwardFailure as e:
        bad = _culprit(model, plan, x)
        where = f"; the first group that breaks it: {bad.members[0]} (ignore it to go on)" if bad is not None else ""
        raise HRankError(f"{e}{where}") from None
    except _Mismatch as e:
        bad = _culprit(model, plan, x)
        where = f"; the first group that breaks it: {bad.members[0]}" if bad is not None else ""
        raise HRankError(f"the physically pruned network does not compute what the masked one does (relative "
                         f"difference {e.rel:.3g} > {CHECK_TOLERANCE:g}){where}; an op hrank cannot map "
                         f"channels through (please report this model); ignore that group to go on") from None
    model.hrank_plan = plan
    model.hrank_mode = mode
    return model


def enforce_masks(model: nn.Module) -> None:
    """Multiply every masked parameter by its 0/1 mask; a no-op for unmasked models.

    Training calls it after every optimizer step so that masked filters (and, in coupled plans, the
    input columns that read pruned channels) stay exactly zero.
    """
    with torch.no_grad():
        for m in model.modules():
            for name, buf in m._buffers.items():
                if buf is not None and name.startswith(_PARAM_MASK):
                    param = getattr(m, name[len(_PARAM_MASK):], None)
                    if isinstance(param, torch.Tensor):
                        param.mul_(buf.to(param.dtype))


def recalibrate_bn(model: nn.Module, batches: Iterable[Any], num_images: int = 512) -> int:
    """Re-estimate every BatchNorm's running statistics on ``num_images`` images; return how many were used.

    Pruning changes what the kept channels see, so the stored statistics are stale. The stats are reset
    and accumulated as a cumulative average (momentum None) in train-mode BN forwards without gradients;
    other layers stay in eval mode (no dropout). Momentum and the train/eval mode are restored afterwards.
    ``batches`` yields image tensors or ``(images, labels)`` pairs.
    """
    if num_images < 1:
        raise HRankError(f"num_images must be >= 1, got {num_images}")
    norms = [m for m in model.modules() if isinstance(m, _BN_TYPES) and m.track_running_stats]
    if not norms:
        return 0
    saved = [(m, m.momentum, m.training) for m in norms]
    was_training = model.training
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    seen = 0
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        with torch.no_grad():
            for batch in batches:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                take = min(len(x), max(2, num_images - seen))  # never a 1-image batch (BatchNorm1d needs 2)
                model(x[:take].to(device, non_blocking=True))
                seen += take
                if seen >= num_images:
                    break
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.train(was_training)
    if seen == 0:
        raise HRankError("BN recalibration got no images")
    return seen


def hrank_rule_counts(model: nn.Module, spec: Spec, input_size: tuple[int, ...] | None = None) -> dict:
    """MACs/params under HRank's own counting rule (output pruning only) for an *unpruned* ``model``.

    ``as_pruned``: ``int(rate * C)`` filters off each conv as the spec prunes them. ``official_counter``
    (GoogLeNet only): the number the official counter prints, which reads inception c4's rate from the
    next entry (a constructor bug), as a :class:`hrank.flops.Counts` too.
    """
    if input_size is None:
        arch = getattr(model, "hrank_arch", None)
        input_size = models.get_spec(arch).input_size if arch else (3, 32, 32)
    out = {"as_pruned": flops.count_hrank_rule(model, spec.pruned_filters(model), input_size)}
    official = spec.official_counter_pruned(model)
    if official is not None:
        out["official_counter"] = flops.count_hrank_rule(model, official, input_size)
    return out


def layer_widths(plan: Plan) -> list[dict]:
    """Per planned conv: unpruned width, kept width, rate of its group, and the group's first member."""
    rows = []
    for g in plan.groups:
        for m in g.members:
            rows.append({"layer": m, "channels": g.channels, "kept": g.width, "rate": g.rate, "group": g.members[0]})
    return rows
