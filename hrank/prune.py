"""Apply a plan: physically (a real, smaller network) or as HRank's 0/1 masks; re-estimate BN statistics.

Physical mode removes channels through Torch-Pruning's dependency graph, one coupled group at a time:
conv, BN and linear weights are sliced, with every consumer's input channels, and the option-A shortcut's
channel map is rewritten (:class:`hrank.plan.ShortcutPruner`). A forward check compares the real widths
with the plan afterwards. The result is an ordinary ``nn.Module``; ``model.hrank_plan`` and
``model.hrank_mode`` record how it was made, and :func:`hrank.save` stores it without pickling modules.

Mask mode keeps every shape and zeroes the pruned filters (conv weight and bias) and the normalization
parameters that carry them (BN gamma/beta; in DenseNet every BN that reads the concatenated channel, as the
official code co-masks). :func:`enforce_masks` re-applies the masks after each optimizer step.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from hrank import flops, models
from hrank.errors import HRankError
from hrank.plan import Plan, build_dependency_graph, find_groups
from hrank.spec import Spec

__all__ = ["apply_plan", "enforce_masks", "recalibrate_bn", "hrank_rule_counts", "layer_widths", "save", "load",
           "model_record", "build_from_record", "MODES"]

MODES = ("physical", "mask")
MASK_BUFFER = "hrank_mask"  # non-persistent buffer on masked modules: 0/1 per output channel (dim 0)
_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _example_input(model: nn.Module, plan: Plan, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        return example_input
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    return torch.zeros(1, *plan.input_size, device=device, dtype=dtype)


def _check_fits(model: nn.Module, plan: Plan, mode: str) -> dict[str, nn.Conv2d]:
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
        if not isinstance(m, nn.Conv2d):
            raise HRankError(f"the plan names conv {name!r}, which this model does not have (plan for another model?)")
        if m.out_channels != channels:
            raise HRankError(f"the plan expects {channels} filters in {name}, the model has {m.out_channels} "
                             f"(plan for another model, or a model that is already pruned?)")
        convs[name] = m
    if mode == "physical" and plan.coupling == "independent":
        raise HRankError("an independent plan (a kept set per conv, ignoring coupling) is only valid in mask "
                         "mode; make a coupled plan for physical pruning")
    return convs


def _output_shape(model: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    with torch.no_grad():
        out = model(x)
    return tuple(out.shape) if isinstance(out, torch.Tensor) else ()


def _forward_check(model: nn.Module, plan: Plan, x: torch.Tensor, expected_out: tuple[int, ...]) -> None:
    """Run the pruned model once; every planned conv must produce exactly its planned width."""
    modules = dict(model.named_modules())
    seen: dict[str, int] = {}
    hooks = [modules[name].register_forward_hook(
        lambda mod, inp, out, name=name: seen.__setitem__(name, int(out.shape[1])))
        for name in plan.layers]
    try:
        shape = _output_shape(model, x)
    except Exception as e:
        raise HRankError(f"the pruned model fails its forward check ({_first_line(e)})") from None
    finally:
        for h in hooks:
            h.remove()
    if expected_out and shape != expected_out:
        raise HRankError(f"the pruned model's output shape {shape} differs from the original {expected_out}")
    for name, kept in plan.layers.items():
        weight_width = modules[name].weight.shape[0]
        if seen.get(name) != len(kept) or weight_width != len(kept):
            raise HRankError(f"forward check: {name} has {seen.get(name, weight_width)} output channels, the plan "
                             f"keeps {len(kept)}")


def _apply_physical(model: nn.Module, plan: Plan, graph: tp.DependencyGraph, convs: dict[str, nn.Conv2d]) -> None:
    found = {m: g for g in find_groups(model, graph=graph) for m in g.members}
    present = {name: list(range(conv.out_channels)) for name, conv in convs.items()}
    for pg in plan.pruned_groups():
        g = found.get(pg.members[0])
        if g is None or set(g.members) != set(pg.members):
            have = ", ".join(g.members[:4]) if g is not None else "nothing"
            raise HRankError(f"the plan couples {', '.join(pg.members[:4])} but this model couples {have} "
                             f"(plan for another model?)")
        if not g.prunable:
            raise HRankError(f"cannot prune group {pg.members[0]}: {g.reason}")
        root = pg.members[0]
        kept = set(pg.kept)
        # plan indices refer to the unpruned conv; translate them to the conv's current positions
        positions = [i for i, c in enumerate(present[root]) if c not in kept]
        try:
            group = graph.get_pruning_group(convs[root], tp.prune_conv_out_channels, positions)
            group.prune()
        except HRankError:
            raise
        except Exception as e:
            raise HRankError(f"Torch-Pruning failed while removing channels of {root} ({_first_line(e)})") from None
        for m in pg.members:
            present[m] = [c for c in present[m] if c in kept]


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


def _add_mask(module: nn.Module, idxs: Iterable[int]) -> None:
    mask = getattr(module, MASK_BUFFER, None)
    if mask is None:
        mask = torch.ones(module.weight.shape[0], device=module.weight.device, dtype=module.weight.dtype)
        module.register_buffer(MASK_BUFFER, mask, persistent=False)
    mask[list(idxs)] = 0


def _apply_masks(model: nn.Module, plan: Plan, graph: tp.DependencyGraph, convs: dict[str, nn.Conv2d]) -> None:
    for pg in plan.pruned_groups():
        kept = set(pg.kept)
        pruned = [c for c in range(pg.channels) if c not in kept]
        for member in pg.members if plan.coupling == "independent" else pg.members[:1]:
            conv = convs[member]
            try:
                group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, pruned)
            except Exception as e:
                raise HRankError(f"dependency analysis failed for {member} ({_first_line(e)})") from None
            own = _first_norms(graph, conv) if plan.coupling == "independent" else None
            for item in group:
                module, handler = item.dep.target.module, item.dep.handler
                if not isinstance(module, nn.Module) or not graph.is_out_channel_pruning_fn(handler):
                    continue
                if isinstance(module, nn.Conv2d):
                    if own is None or module is conv:
                        _add_mask(module, item.idxs)
                elif isinstance(module, _BN_TYPES) and module.affine and (own is None or module in own):
                    _add_mask(module, item.idxs)
    enforce_masks(model)


def apply_plan(model: nn.Module, plan: Plan, *, mode: str = "physical",
               example_input: torch.Tensor | None = None) -> nn.Module:
    """Prune ``model`` in place by ``plan`` and return it; sets ``model.hrank_plan`` and ``model.hrank_mode``.

    ``physical`` removes the channels (a smaller, faster network); ``mask`` zeroes them with 0/1 masks and
    keeps every shape (HRank's way; call :func:`enforce_masks` after each optimizer step). The model's
    train/eval mode is kept. Build optimizers after this call: physical pruning replaces parameters.
    """
    convs = _check_fits(model, plan, mode)
    x = _example_input(model, plan, example_input)
    was_training = model.training
    try:
        model.eval()
        expected_out = _output_shape(model, x) if mode == "physical" else ()
        graph = build_dependency_graph(model, x)
        if mode == "physical":
            _apply_physical(model, plan, graph, convs)
            model.eval()
            _forward_check(model, plan, x, expected_out)
        else:
            _apply_masks(model, plan, graph, convs)
    finally:
        model.train(was_training)
    model.hrank_plan = plan
    model.hrank_mode = mode
    return model


def enforce_masks(model: nn.Module) -> None:
    """Multiply every masked module's weight (and bias) by its 0/1 mask; a no-op for unmasked models.

    Training calls it after every optimizer step so that masked filters stay exactly zero.
    """
    with torch.no_grad():
        for m in model.modules():
            mask = getattr(m, MASK_BUFFER, None)
            if mask is None:
                continue
            weight = getattr(m, "weight", None)
            if weight is not None:
                weight.mul_(mask.view(-1, *([1] * (weight.dim() - 1))).to(weight.dtype))
            bias = getattr(m, "bias", None)
            if bias is not None:
                bias.mul_(mask.to(bias.dtype))


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


# Save/load live in hrank/checkpoint.py; re-exported here as part of this module's contract.
from hrank.checkpoint import build_from_record, load, model_record, save  # noqa: E402
