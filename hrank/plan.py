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

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning.dependency import index_mapping as tp_index_mapping

from hrank import __version__, models
from hrank.errors import HRankError
from hrank.io import _error_line, atomic_write_json, describe_json, is_json_int
from hrank.layers import CONV_TYPES, HRANK_TENSOR_PREFIX, conv_names, is_conv, is_grouped
from hrank.models.base import ChannelPadShortcut
from hrank.spec import Spec, num_pruned

__all__ = ["Group", "Plan", "PlanGroup", "WIDTH_RULES", "build_dependency_graph", "default_example_input",
           "find_groups", "make_plan", "select_kept", "verify_groups", "ShortcutPruner"]

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


_FROZEN_NORM_BUFFERS = ("weight", "bias", "running_mean", "running_var")


def is_frozen_norm(m: nn.Module) -> bool:
    """A BatchNorm whose affine and statistics are buffers, not parameters (torchvision's and detectron2's
    ``FrozenBatchNorm2d``): no parameters, no children, and ``weight``/``bias``/``running_mean``/``running_var``
    buffers of one channel count (any other buffer a scalar)."""
    if next(m.parameters(recurse=False), None) is not None or next(m.children(), None) is not None:
        return False
    buffers = {n: b for n, b in m.named_buffers(recurse=False) if b is not None}
    if any(n not in buffers for n in _FROZEN_NORM_BUFFERS):
        return False
    shapes = {tuple(buffers[n].shape) for n in _FROZEN_NORM_BUFFERS}
    return (len(shapes) == 1 and len(next(iter(shapes))) == 1
            and all(b.dim() == 0 for n, b in buffers.items() if n not in _FROZEN_NORM_BUFFERS))


class FrozenNormPruner(tp.pruner.BasePruningFunc):
    """Torch-Pruning pruner for frozen BatchNorms (:func:`is_frozen_norm`): like BatchNorm, its input and
    output are the same channels; pruning slices its four per-channel buffers (Torch-Pruning never touches
    buffers, so without it a frozen BN blocked every group it sits on)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        width = layer.weight.shape[0]
        keep = torch.tensor([c for c in range(width) if c not in drop], dtype=torch.long, device=layer.weight.device)
        for name in _FROZEN_NORM_BUFFERS:
            layer._buffers[name] = layer._buffers[name].index_select(0, keep).clone()
        if isinstance(getattr(layer, "num_features", None), int):
            layer.num_features = len(keep)
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.weight.shape[0]


class InstanceNormPruner(tp.pruner.function.InstanceNormPruner):
    """Torch-Pruning's InstanceNorm pruner, which slices ``weight`` and ``bias`` only, plus the running statistics
    of an InstanceNorm built with ``track_running_stats=True`` (without them its forward fails after pruning)."""

    def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = [c for c in range(layer.num_features) if c not in drop]
        layer = super().prune_out_channels(layer, idxs)
        for name in ("running_mean", "running_var"):
            buf = layer._buffers.get(name)
            if buf is not None and buf.dim() == 1 and buf.shape[0] != len(keep):
                layer._buffers[name] = buf.index_select(0, torch.tensor(keep, dtype=torch.long,
                                                                        device=buf.device)).clone()
        return layer

    prune_in_channels = prune_out_channels


def default_example_input(model: nn.Module) -> torch.Tensor:
    """A zero batch of one image at the registry's input size (registered models only)."""
    arch = getattr(model, "hrank_arch", None)
    if arch is None:
        raise HRankError("pass example_input (one input batch) for a model outside the hrank registry")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    return torch.zeros(1, *models.get_spec(arch).input_size, device=device)


_INDEX_UPDATES = ("update_concat_index_mapping", "update_split_index_mapping", "update_reshape_index_mapping",
                  "update_unbind_index_mapping", "update_expand_index_mapping", "update_slice_index_mapping")


def _guarded(fn: Callable) -> Callable:
    """Torch-Pruning's index-mapping update ``fn``, guarded for graphs hrank builds (they carry
    ``hrank_opaque``): opaque nodes are skipped, and a node whose update fails (a channel shuffle's reshape
    divides by zero in 1.6.1) becomes opaque instead of aborting the trace. Other graphs are unchanged."""
    def update(graph, node):
        opaque = getattr(graph, "hrank_opaque", None)
        if opaque is None:
            return fn(graph, node)
        if node in opaque:
            return None
        positions = getattr(graph, "hrank_concat_positions", {}).get(node)
        if positions is not None and fn.__name__ == "update_concat_index_mapping":
            return _map_concat(graph, node, positions)
        try:
            return fn(graph, node)
        except Exception:
            opaque.add(node)
            return None
    update.hrank_guarded = True
    return update


# Torch-Pruning recomputes index mappings on every get_pruning_group call, so the guard must stay in place.
for _name in _INDEX_UPDATES:
    _fn = getattr(tp_index_mapping, _name, None)
    if _fn is not None and not getattr(_fn, "hrank_guarded", False):
        setattr(tp_index_mapping, _name, _guarded(_fn))


def _opaque_reshapes(graph: tp.DependencyGraph) -> set:
    """Reshapes that shuffle channels: a view whose input has more than 4 dims (back from (N, g, C/g, H, W)),
    and the view into 5 dims that precedes it through transposes/copies. Torch-Pruning 1.6.1 maps them as
    a flatten (wrong channels, or a division by zero); groups through them must not be pruned."""
    out = set()
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.RESHAPE or node.grad_fn is None:
            continue
        sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None) or getattr(node.grad_fn, "_saved_self_sizes", None)
        if sizes is None or len(sizes) <= 4:
            continue
        out.add(node)
        stack = list(node.inputs)
        while stack:  # back through the transpose/contiguous chain to the view that split the channels
            prev = stack.pop()
            if prev in out:
                continue
            if prev.type == tp.ops.OPTYPE.RESHAPE:
                out.add(prev)
            elif prev.type == tp.ops.OPTYPE.ELEMENTWISE and len(prev.inputs) == 1:
                out.add(prev)
                stack.extend(prev.inputs)
    return out


def _channel_splitting_views(graph: tp.DependencyGraph, seen: Mapping[Any, tuple]) -> set:
    """Reshapes that split the channel dimension into more dimensions (a maxout's ``view(N, C // k, k, H, W)``,
    a grouped attention's heads): Torch-Pruning 1.6.1 maps every reshape as a flatten, which is wrong here."""
    out = set()
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.RESHAPE or node.grad_fn is None:
            continue
        record = seen.get(node.grad_fn)
        if record is None or not record[1]:
            continue
        before, after = record[1][0], record[2]
        if len(after) > len(before) >= 2 and after[1] != before[1]:
            out.add(node)
    return out


def _channel_dim(dim: int, sizes: Sequence[int]) -> bool:
    return len(sizes) >= 2 and dim % len(sizes) == 1


def _opaque_splits(graph: tp.DependencyGraph) -> set:
    """Splits, chunks, unbinds and slices of the channel dimension: their sizes and bounds are literals in
    ``forward`` that pruning cannot rewrite (``y[:, 1:]`` or ``split(y, [1, 7])`` would then cut the pruned
    tensor in the wrong place). A slice that keeps every channel (``y[:, :C]``, ``y[:, 0:]``) is harmless."""
    kinds = (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND)
    out = set()
    for node in graph.module2node.values():
        gf = node.grad_fn
        if node.type not in kinds or gf is None:
            continue
        sizes = getattr(gf, "_saved_self_sym_sizes", None) or getattr(gf, "_saved_self_sizes", None)
        dim = getattr(gf, "_saved_dim", None)
        if sizes is None or dim is None:
            out.add(node)  # cannot tell which dimension: do not trust it
            continue
        sizes = [int(d) for d in sizes]
        if not _channel_dim(int(dim), sizes):
            continue
        if node.type == tp.ops.OPTYPE.SLICE:
            start, end, step = (getattr(gf, f"_saved_{k}", None) for k in ("start", "end", "step"))
            if start in (0, None) and (end is None or end >= sizes[1]) and step in (1, None):
                continue  # a full slice: the same channels whatever the width
        out.add(node)
    return out


def _map_concat(graph: tp.DependencyGraph, node: Any, positions: Sequence[int]) -> None:
    """Torch-Pruning's concatenation mapping, with each traced input at its real place among all the tensors
    concatenated (``positions``; ``node.module.concat_sizes`` holds every tensor's size, traced or not, and
    Torch-Pruning's concat pruner keeps it current as channels are removed)."""
    offsets = [0]
    for ch in node.module.concat_sizes:
        offsets.append(offsets[-1] + int(ch))
    node.module.offsets = offsets
    done: list[Any] = []
    for k, in_node in enumerate(node.inputs):
        span = offsets[positions[k]: positions[k] + 2]
        for deps, target, reverse in ((node.dependencies, in_node, True), (in_node.dependencies, node, False)):
            for dep in deps:
                if dep.target == target and not any(dep is d for d in done):
                    dep.index_mapping[1] = tp_index_mapping._ConcatIndexMapping(offset=span, reverse=reverse)
                    done.append(dep)
                    break


def _fix_concats(graph: tp.DependencyGraph, seen: Mapping[Any, tuple]) -> set:
    """Concatenations of channels that hold a tensor the trace does not follow (the network's input, a tensor
    built in ``forward`` such as CoordConv's coordinates). Torch-Pruning 1.6.1 leaves such a tensor out of the
    offsets (the channels after it are mapped to the wrong places) or gives up and couples unrelated convs.
    hrank maps them with the recorded sizes of every tensor; the concatenations it cannot align are returned
    (opaque)."""
    opaque = set()
    positions_of: dict[Any, list[int]] = {}
    for node in graph.module2node.values():
        if node.type != tp.ops.OPTYPE.CONCAT or node.grad_fn is None:
            continue
        record = seen.get(node.grad_fn)
        dim = getattr(node.grad_fn, "_saved_dim", None)
        if record is None:  # not seen by the recorder (inside TorchScript): trust only a mapping that was made
            if getattr(node.module, "offsets", None) is None and dim is not None and int(dim) in (1, -3):
                opaque.add(node)
            continue
        _, inputs, shape = record
        if dim is None or not _channel_dim(int(dim), shape):
            continue
        real = [int(s[1]) if len(s) >= 2 else -1 for s in inputs]
        inferred = getattr(node.module, "concat_sizes", None)
        traced = [i for i, (fn, _) in enumerate(node.grad_fn.next_functions) if fn is not None]
        if len(traced) == len(real) and inferred is not None and getattr(node.module, "offsets", None) is not None \
                and [None if c is None else int(c) for c in inferred] == real:
            continue  # Torch-Pruning's own mapping is right
        if len(real) != len(node.grad_fn.next_functions) or len(node.inputs) != len(traced) \
                or min(real, default=-1) < 0 or sum(real) != shape[1]:
            opaque.add(node)
            continue
        node.module.concat_sizes = real
        positions_of[node] = traced
    graph.hrank_concat_positions = positions_of
    for node, positions in positions_of.items():
        _map_concat(graph, node, positions)
    return opaque


def _cut(graph: tp.DependencyGraph, opaque: set) -> None:
    """Stop every dependency walk at the opaque nodes: groups reach them (and are then reported as not
    prunable) but never map indices through them."""
    for node in opaque:
        node.dependencies = []
    for node in graph.module2node.values():
        for dep in node.dependencies:
            if dep.target in opaque:
                dep.index_mapping = [tp.dependency.constants.INDEX_MAPPING_PLACEHOLDER] * 2


class _TrainMode(nn.Module):
    """Runs the wrapped model in training mode whatever ``eval()`` was called (Torch-Pruning traces in eval
    mode; this traces the branches a model runs only in training, such as auxiliary heads)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any) -> Any:
        self.inner.train()
        return self.inner(*args)


def _weighted(m: nn.Module) -> bool:
    return next(m.parameters(recurse=False), None) is not None


class _Preserved:
    """Restores the model's buffers (BatchNorm statistics), train/eval modes and the RNG state after a
    forward pass run only to look at the model, so that looking changes nothing."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x

    def __enter__(self) -> None:
        self.modes = {m: m.training for m in self.model.modules()}
        self.buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        devices = [self.x.device.index or 0] if self.x.is_cuda else []
        self.rng = torch.random.fork_rng(devices=devices)
        self.rng.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.rng.__exit__(None, None, None)
        with torch.no_grad():
            for b, v in self.buffers:
                b.copy_(v)
        for m, training in self.modes.items():
            m.training = training


def _called(model: nn.Module, x: torch.Tensor, training: bool) -> set[nn.Module]:
    """The modules with parameters that a forward pass in the given mode calls (nothing is changed)."""
    seen: set[nn.Module] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(mod)) for m in model.modules() if _weighted(m)]
    try:
        with _Preserved(model, x), torch.no_grad():
            model.train(training)
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _in_training(fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``fn(x)`` for a training-mode pass, retried on the batch doubled when it fails: BatchNorm in training
    mode needs two values per channel, and the example is often a batch of one."""
    try:
        return fn(x)
    except Exception:
        return fn(torch.cat([x, x]))


def _train_only(model: nn.Module, x: torch.Tensor) -> set[nn.Module]:
    """Modules with parameters that run in training mode but not in eval mode (auxiliary heads). Empty when
    a training-mode pass cannot run at all (a loss inside forward): training would then fail for reasons of
    its own, before pruning matters."""
    try:
        train = _in_training(lambda batch: _called(model, batch, True), x)
    except Exception:
        return set()
    return train - _called(model, x, False)


def _shapes(value: Any) -> list[tuple[int, ...]]:
    if isinstance(value, torch.Tensor):
        return [tuple(value.shape)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _shapes(v)]
    return []


_FUNCTIONAL_LAYERS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
                      "linear", "bilinear")
# Layers whose buffers Torch-Pruning prunes with the layer (BatchNorm's statistics) or that own none per channel.
_PRUNED_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                  nn.PReLU, nn.Embedding)


# Ops whose output shape equals their input's but whose channels depend on other channels (Torch-Pruning maps
# them one to one): along ``dim``/``dims`` (the argument at the given position when not a keyword), or always.
_ALONG_DIM = {"softmax": 1, "log_softmax": 1, "softmin": 1, "cumsum": 1, "cumprod": 1, "logcumsumexp": 1,
              "cummax": 1, "cummin": 1, "sort": 1, "argsort": 1, "flip": 1, "roll": 2}
_ALWAYS_MIXING = ("local_response_norm",)


def _mixes_channels(name: str, args: Sequence[Any], kwargs: Mapping[str, Any], ndim: int) -> bool:
    """Whether op ``name`` called with ``args``/``kwargs`` on an ``ndim``-dim tensor mixes the channels (dim 1)
    with each other: a softmax or cumulative sum over channels, a flip or roll of them, a local response norm.
    When the dimension cannot be read, it is taken to be the channels' (pruning would otherwise be unsafe)."""
    if name in _ALWAYS_MIXING:
        return True
    if name not in _ALONG_DIM:
        return False
    key = "dims" if name in ("flip", "roll") else "dim"
    position = _ALONG_DIM[name]
    value = kwargs[key] if key in kwargs else args[position] if len(args) > position else None
    if value is None:
        return not (name in ("sort", "argsort") and key not in kwargs and len(args) <= position)  # sort: dim -1
    dims = value if isinstance(value, (list, tuple)) else [value]
    try:
        return any(int(d) % ndim == 1 for d in dims)
    except (TypeError, ValueError):
        return True


class _ShapeRecorder(TorchFunctionMode):
    """Records, for each autograd node a torch function creates, the function's name, its tensor inputs'
    shapes and its output's shape (the first function to produce a node wins: ``contiguous()`` on a
    contiguous tensor returns its input)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[Any, tuple[str, list[tuple[int, ...]], tuple[int, ...]]] = {}
        self.inside = 0  # > 0 inside a layer's forward: its ops are the layer's own (a conv subclass may scale
        # its weight and call F.conv2d, which changes the channel count, as the layer does)
        self.stack: list[nn.Module] = []  # the modules whose forward is running, innermost last
        self.fixed: dict[Any, str] = {}  # grad_fn -> what it reads that pruning cannot shrink (a phrase)
        self.mixing: set[Any] = set()  # grad_fns of ops that mix channels with each other at equal shape

    def watch(self, model: nn.Module) -> list[Any]:
        """Hooks that tell the recorder when a conv or linear layer's own forward runs, and which module's
        forward issues each op."""
        def enter(*_: Any) -> None:
            self.inside += 1

        def leave(*_: Any) -> None:
            self.inside -= 1

        def push(module: nn.Module, *_: Any) -> None:
            self.stack.append(module)

        def pop(*_: Any) -> None:
            if self.stack:
                self.stack.pop()

        self.names = {m: n for n, m in model.named_modules()}
        self.frozen = {m for m in model.modules() if is_frozen_norm(m)}
        hookable = [m for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]  # (no hooks there)
        layers = [m for m in hookable if isinstance(m, (*CONV_TYPES, nn.Linear))]
        hooks = [h for m in layers for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
        return hooks + [h for m in hookable for h in (m.register_forward_pre_hook(push), m.register_forward_hook(pop))]

    def _fixed_buffer(self, channels: int) -> str | None:
        """The buffer of the module issuing the op that has a dimension of ``channels``: a fixed per-channel
        tensor (a BlurPool's filter sized for a set channel count) that pruning cannot shrink, since
        Torch-Pruning prunes layers and parameters, never buffers. Layers it prunes itself (and those hrank
        gives it pruners for, ChannelPadShortcut and frozen BatchNorms, and hrank's mask buffers) are exempt."""
        if not self.stack or channels <= 1:
            return None
        owner = self.stack[-1]
        if isinstance(owner, (*_PRUNED_LAYERS, ChannelPadShortcut)) or owner in self.frozen:
            return None
        for name, buf in owner.named_buffers(recurse=False):
            if buf is None or buf.dim() == 0 or name.startswith(HRANK_TENSOR_PREFIX):
                continue
            if buf.shape[0] == channels or (buf.dim() >= 2 and buf.shape[1] == channels):  # (C, ...) or (1, C, ...)
                return (f"the buffer {name} of {self.names.get(owner, '?')} ({type(owner).__name__}), a fixed "
                        f"per-channel tensor that pruning cannot shrink (e.g. an anti-aliasing BlurPool with a set "
                        f"channel count)")
        return None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        grad_fn = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        if grad_fn is not None and grad_fn not in self.seen and not self.inside:
            name = getattr(func, "__name__", str(func))
            self.seen[grad_fn] = (name, _shapes(list(args)) + _shapes(list((kwargs or {}).values())),
                                  tuple(out.shape))
            fixed = self._fixed_buffer(out.shape[1]) if out.dim() >= 2 else None
            if fixed is None and name in _FUNCTIONAL_LAYERS:
                fixed = self._loose_weight(name, [*args, *(kwargs or {}).values()])
            if fixed is not None:
                self.fixed[grad_fn] = fixed
            if out.dim() >= 2 and _mixes_channels(name, args, kwargs or {}, out.dim()):
                self.mixing.add(grad_fn)
        return out

    def _loose_weight(self, op: str, args: Sequence[Any]) -> str | None:
        """A functional conv or linear outside a layer's forward whose weight is a parameter (``F.conv2d(x,
        self.weight)`` in a custom module): Torch-Pruning takes the op for an element-wise one and would cut the
        weight along its last dimension."""
        weight = next((a for a in args if isinstance(a, nn.Parameter) and a.dim() >= 2), None)
        if weight is None:
            return None
        owner = self.stack[-1] if self.stack else None
        where = f" of {self.names.get(owner, '?')} ({type(owner).__name__})" if owner is not None else ""
        return (f"the parameter weight{where} of a functional {op} outside a conv or linear layer, which "
                f"Torch-Pruning cannot map (use an nn.Conv2d or nn.Linear)")


def _remaps_channels(name: str, inputs: Sequence[tuple[int, ...]], out: tuple[int, ...]) -> bool:
    """Whether an op Torch-Pruning passes channels through one to one (its element-wise kind) changes their
    number or mixes them with another dimension: a pixel shuffle, a matrix product over channels, padding
    of channels. Permutations of the dimensions keep the channels (Torch-Pruning follows them)."""
    if len(out) < 2:
        return False
    if name in ("permute", "transpose", "transpose_", "movedim", "moveaxis", "swapaxes", "swapdims", "t"):
        return False
    return any(len(s) >= 2 and s[1] not in (1, out[1]) for s in inputs)


def _trace(model: nn.Module, x: torch.Tensor) -> tp.DependencyGraph:
    graph = tp.DependencyGraph()
    graph.hrank_opaque = set()
    graph.hrank_remaps = {}  # node -> the torch function's name
    graph.hrank_fixed = {}  # node -> what it reads that pruning cannot shrink (a buffer, a loose conv weight)
    recorder = _ShapeRecorder()
    hooks = recorder.watch(model)
    pruners: dict[type, tp.pruner.BasePruningFunc] = {ChannelPadShortcut: ShortcutPruner()}
    pruners.update({type(m): FrozenNormPruner() for m in recorder.frozen})
    pruners.update({type(m): InstanceNormPruner() for m in model.modules()
                    if isinstance(m, nn.modules.instancenorm._InstanceNorm)})
    try:
        with torch.enable_grad(), recorder:
            graph.build_dependency(
                model, example_inputs=(x,), customized_pruners=pruners, verbose=False)
    except HRankError:
        raise
    except Exception as e:
        raise HRankError(f"cannot trace the model for dependency analysis ({_error_line(e)}); "
                         f"check that example_input fits the model") from None
    finally:
        for h in hooks:
            h.remove()
    for node in graph.module2node.values():
        seen = recorder.seen.get(node.grad_fn) if node.type == tp.ops.OPTYPE.ELEMENTWISE else None
        if seen is not None and (_remaps_channels(*seen) or node.grad_fn in recorder.mixing):
            graph.hrank_remaps[node] = seen[0]
        elif seen is not None and node.grad_fn in recorder.fixed:
            graph.hrank_fixed[node] = recorder.fixed[node.grad_fn]
    graph.hrank_scripted = tuple(n for m, n in recorder.names.items() if isinstance(m, torch.jit.ScriptModule))
    graph.hrank_max_indices = max([math.prod(out[1:]) for _, _, out in recorder.seen.values() if len(out) >= 2]
                                  + [4096])
    graph.hrank_opaque |= (_opaque_reshapes(graph) | _channel_splitting_views(graph, recorder.seen)
                           | _opaque_splits(graph) | _fix_concats(graph, recorder.seen)
                           | set(graph.hrank_remaps) | set(graph.hrank_fixed))
    _cut(graph, graph.hrank_opaque)
    return graph


def _require_tensor(x: Any) -> None:
    """``example_input`` must be one batch tensor: hrank traces, ranks and checks models that take one input."""
    if not isinstance(x, torch.Tensor):
        raise HRankError(f"example_input must be one tensor (a batch of inputs), got {type(x).__name__}; hrank "
                         f"prunes models whose forward takes one input")


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor | None = None) -> tp.DependencyGraph:
    """Trace ``model`` with Torch-Pruning (grad on, model mode restored afterwards); errors become one line.

    The graph carries ``hrank_opaque``: nodes whose channel mapping hrank cannot trust (see
    :func:`find_groups`); groups through them are reported as not prunable instead of crashing or,
    worse, being pruned with the wrong channels. When the model runs layers only in training mode
    (``hrank_train_only``, e.g. an auxiliary head), ``hrank_train_graph`` is a second trace in training
    mode, so that groups whose channels those layers read are reported as not prunable too.
    """
    x = default_example_input(model) if example_input is None else example_input
    _require_tensor(x)
    if x.is_floating_point() and not any(p.requires_grad for p in model.parameters()):
        x = x.detach().clone().requires_grad_(True)  # a frozen model still builds an autograd graph
    was_training = model.training
    try:
        graph = _trace(model, x)
    finally:
        model.train(was_training)  # build_dependency calls eval() and leaves it so
    graph.hrank_train_only = _train_only(model, x)
    graph.hrank_train_graph = None
    if graph.hrank_train_only:
        try:
            with _Preserved(model, x):
                graph.hrank_train_graph = _in_training(lambda batch: _trace(_TrainMode(model), batch), x)
        except HRankError as e:
            raise HRankError(f"the model runs {len(graph.hrank_train_only)} layer(s) only in training mode "
                             f"(an auxiliary head?) and tracing it in training mode failed: {e}") from None
    return graph


@dataclass(frozen=True)
class Group:
    """Convs whose output channels are coupled (one kept set), their width, and whether hrank can prune them.

    ``blocks`` > 1: a grouped conv writes or reads these channels in that many equal blocks; every block
    must keep the same number of channels (chosen within the block).
    """

    members: tuple[str, ...]
    channels: int
    prunable: bool = True
    reason: str = ""
    blocks: int = 1


def _module_names(model: nn.Module) -> dict[nn.Module, str]:
    names: dict[nn.Module, str] = {}
    for name, m in model.named_modules():
        names.setdefault(m, name)
    return names


# A flatten mapping turns each channel index into ``stride`` indices. Torch-Pruning 1.6.1 maps some reshape
# cycles (global-context attention's view(N, C, HW) and back; ECA's Conv1d over channels) as flattens applied
# again and again: 256 indices became 16M and the analysis of one group ran for hours. A real flatten maps at
# most the elements of one sample of its input, so hrank stops a walk whose indices outgrow the largest
# activation the trace saw (``graph.hrank_max_indices``; this cap outside such a walk) and the group is not
# prunable.
MAX_MAPPED_INDICES = 1 << 22
_index_limit: ContextVar[int] = ContextVar("hrank_index_limit", default=MAX_MAPPED_INDICES)


class _RunawayMapping(Exception):
    pass


def _capped_flatten(call: Callable) -> Callable:
    def mapped(self: Any, idxs: Any) -> Any:
        limit = _index_limit.get()
        if not self.reverse and len(idxs) * self._stride > limit:
            raise _RunawayMapping(f"Torch-Pruning's index mapping grew past {limit:,} channel indices, more than "
                                  f"any activation holds, at a reshape it maps as a flatten (a reshape cycle, e.g. "
                                  f"global-context or ECA attention)")
        return call(self, idxs)
    mapped.hrank_guarded = True
    return mapped


if not getattr(tp_index_mapping._FlattenIndexMapping.__call__, "hrank_guarded", False):
    tp_index_mapping._FlattenIndexMapping.__call__ = _capped_flatten(tp_index_mapping._FlattenIndexMapping.__call__)


def _group_of(graph: tp.DependencyGraph, conv: nn.Module, idxs: Sequence[int]):
    token = _index_limit.set(getattr(graph, "hrank_max_indices", MAX_MAPPED_INDICES))
    try:
        return graph.get_pruning_group(conv, tp.prune_conv_out_channels, list(idxs))
    except Exception as e:
        raise HRankError(f"dependency analysis failed ({_error_line(e)})") from None
    finally:
        _index_limit.reset(token)


def _node_label(node: Any, names: dict[nn.Module, str]) -> str:
    module = node.module
    if isinstance(module, nn.Module) and module in names:
        return f"{names[module]} ({type(module).__name__})"
    grad_fn = getattr(node, "grad_fn", None)
    return type(grad_fn).__name__.replace("Backward0", "").lower() if grad_fn is not None else str(node.name)


def _conv_constraints(module: nn.Module, name: str, out_side: bool, identity: bool, channels: int
                      ) -> tuple[int, str | None]:
    """(blocks, reason) that a conv reading (``out_side`` False) or writing these channels imposes."""
    if not isinstance(module, CONV_TYPES):
        return 1, f"{name} is a {type(module).__name__} (only Conv2d and ConvTranspose2d are supported)"
    if hasattr(module, "weight_g") or hasattr(module, "parametrizations"):
        return 1, f"conv {name} has a weight norm or another parametrization of its weight, which pruning " \
                  f"cannot rewrite (remove it before pruning)"
    if module.transposed and module.groups > 1:
        return 1, f"grouped ConvTranspose2d {name} (groups={module.groups}) is not supported"
    if module.groups > 1 and module.groups == module.out_channels and module.in_channels != module.out_channels:
        return 1, f"conv {name} has groups == out_channels but in_channels != out_channels"
    if not is_grouped(module):
        return 1, None
    if module.transposed:
        return 1, f"grouped ConvTranspose2d {name} (groups={module.groups}) is not supported"
    width = module.out_channels if out_side else module.in_channels
    if not identity or width != channels:
        return 1, f"grouped conv {name} (groups={module.groups}) reaches these channels through a re-mapping"
    if width // module.groups <= 1:
        return 1, f"grouped conv {name} (groups={module.groups}) {'writes' if out_side else 'reads'} these " \
                  f"channels one per group"
    return module.groups, None


def _side_width(graph: tp.DependencyGraph, node: Any, handler: Any) -> int | None:
    """The channel count of the side of ``node``'s layer that ``handler`` prunes (None when unknown)."""
    pruner = graph.get_pruner_of_module(node.module) if isinstance(node.module, nn.Module) else None
    if pruner is None:
        return None
    try:
        pruner.pruning_dim = node.pruning_dim
        width = pruner.get_out_channels(node.module) if graph.is_out_channel_pruning_fn(handler) \
            else pruner.get_in_channels(node.module)
    except Exception:
        return None
    return int(width) if isinstance(width, int) else None


def _describe_group(graph: tp.DependencyGraph, conv: nn.Module, names: dict[nn.Module, str],
                    order: Callable[[str], int]) -> Group:
    """Members, block structure and prunability of the group rooted at ``conv`` (all its channels)."""
    group = _group_of(graph, conv, range(conv.out_channels))
    members: list[nn.Module] = []
    reasons: list[str] = []
    blocks = 1
    opaque = getattr(graph, "hrank_opaque", set())
    remaps = getattr(graph, "hrank_remaps", {})
    fixed = getattr(graph, "hrank_fixed", {})
    param_names = getattr(graph, "_param_to_name", {})
    scripted_modules = getattr(graph, "hrank_scripted", ())
    for item in group:
        target, handler = item.dep.target, item.dep.handler
        module = target.module
        if target in opaque and target.type in (tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE, tp.ops.OPTYPE.UNBIND):
            reasons.append(f"its channels are split or sliced by position ({_node_label(target, names)}: "
                           f"torch.split/chunk/unbind or y[:, a:b] in forward), which pruning cannot rewrite")
        elif remaps.get(target) == "pad":
            reasons.append("its channels are padded (F.pad on the channel dimension, e.g. an option-A shortcut "
                           "written as a lambda), which pruning cannot rewrite: use hrank.models.ChannelPadShortcut")
        elif target in fixed:
            reasons.append(f"its channels meet {fixed[target]} (in {_node_label(target, names)})")
        elif target in remaps:
            reasons.append(f"its channels pass {_node_label(target, names)}, an op that changes their number or "
                           f"mixes them with another dimension (e.g. a pixel shuffle or a matrix product), "
                           f"which hrank cannot map")
        elif target in opaque and target.type == tp.ops.OPTYPE.CONCAT:
            reasons.append(f"its channels are concatenated ({_node_label(target, names)}) with a tensor the trace "
                           f"cannot follow (the network's input, or one built in forward such as coordinates), so "
                           f"their positions after the concatenation are unknown")
        elif target in opaque:
            reasons.append(f"its channels pass {_node_label(target, names)}, a reshape hrank cannot map "
                           f"(e.g. a channel shuffle)")
        if target.type == tp.ops.OPTYPE.OUTPUT or (not target.outputs and graph.is_out_channel_pruning_fn(handler)):
            reasons.append("its channels are an output of the network")
        if isinstance(module, nn.Parameter):
            dim = getattr(target, "pruning_dim", -1)
            if module.dim() == 0 or any(int(i) >= module.shape[dim] for i in item.idxs):
                reasons.append(f"its channels reach parameter {param_names.get(module, '?')} {tuple(module.shape)}, "
                               f"whose dimension Torch-Pruning would cut does not hold them (a loose parameter used "
                               f"by a functional op)")
            owner = param_names.get(module, "").rpartition(".")[0]
            scripted = next((n for n in scripted_modules if owner == n or owner.startswith(n + ".")), None)
            if scripted is not None:
                reasons.append(f"its channels reach TorchScript module {scripted}, whose ops hrank cannot see "
                               f"(prune the Python module, then script it)")
        if not isinstance(module, nn.Module):
            continue
        name = names.get(module, "?")
        width = _side_width(graph, target, handler)
        if width is not None and item.idxs and max(int(i) for i in item.idxs) >= width:
            reasons.append(f"its channels are mapped past the {width} "
                           f"{'outputs' if graph.is_out_channel_pruning_fn(handler) else 'inputs'} of {name} (a "
                           f"reshape hrank cannot map, e.g. a flatten after a transpose)")
            continue
        if isinstance(module, nn.GroupNorm):
            reasons.append(f"GroupNorm {name} normalizes across these channels")
            continue
        if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
            reasons.append(f"LayerNorm {name} normalizes over {tuple(module.normalized_shape)}, not channels alone")
            continue
        if not isinstance(module, nn.modules.conv._ConvNd):
            continue
        out_side = graph.is_out_channel_pruning_fn(handler)
        identity = list(item.idxs) == list(item.root_idxs)
        if out_side and isinstance(module, CONV_TYPES) and module not in members:
            members.append(module)
        b, why = _conv_constraints(module, name, out_side, identity, conv.out_channels)
        if why:
            reasons.append(why)
            continue
        blocks = math.lcm(blocks, b)
        if out_side and not identity:
            reasons.append(f"{name} reaches the group through a channel re-mapping")
    train_graph = getattr(graph, "hrank_train_graph", None)
    if train_graph is not None:
        reached = {item.dep.target.module for item in group}
        try:
            extra = [item.dep.target.module for item in _group_of(train_graph, conv, range(conv.out_channels))]
        except HRankError as e:
            reasons.append(f"in training mode {e}")
            extra = []
        extra = [m for m in dict.fromkeys(extra) if isinstance(m, nn.Module) and _weighted(m) and m not in reached]
        if extra:
            only = " (it runs only in training mode, e.g. an auxiliary head)" \
                if extra[0] in graph.hrank_train_only else ""
            reasons.append(f"in training mode its channels also reach {names.get(extra[0], '?')}{only}, which "
                           f"the eval-mode trace cannot prune")
    member_names = sorted((names[m] for m in members), key=order)
    widths = {m.out_channels for m in members}
    if len(widths) > 1:
        listing = ", ".join(f"{names[m]} ({m.out_channels})" for m in members[:4])
        reasons.append(f"convs of different widths were found coupled ({listing}); a channel-changing op that "
                       f"the tracer cannot see (e.g. F.pad on channels, an option-A shortcut written as a "
                       f"lambda) is the usual cause: use hrank.models.ChannelPadShortcut")
    if blocks > 1 and conv.out_channels % blocks:
        reasons.append(f"grouped convs split these {conv.out_channels} channels into {blocks} blocks unevenly")
    return Group(tuple(member_names), conv.out_channels, not reasons, "; ".join(dict.fromkeys(reasons)),
                 blocks if not reasons else 1)


def _order_key(model: nn.Module) -> Callable[[str], int]:
    """Sort key: a module name's position in ``named_modules`` (registration order)."""
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return lambda name: position.get(name, len(position))


def find_groups(model: nn.Module, example_input: torch.Tensor | None = None, *,
                graph: tp.DependencyGraph | None = None) -> list[Group]:
    """All coupled groups of the model's conv output channels (Conv2d, ConvTranspose2d), in module order.

    Every conv that runs in the forward pass belongs to exactly one group (most are alone). A group is
    marked not prunable (with the reason) when its channels reach the network output, pass a reshape
    hrank cannot map (a channel shuffle), a GroupNorm or a LayerNorm over more than channels, a grouped
    conv through a re-mapping, or couple convs of different widths (a tracing failure). Grouped convs
    (ResNeXt, RegNet) give the group ``blocks``: every block keeps the same number of channels.
    """
    graph = graph if graph is not None else build_dependency_graph(model, example_input)
    names = _module_names(model)
    order = _order_key(model)
    assigned: set[str] = set()
    groups = []
    for name, m in model.named_modules():
        if not is_conv(m) or name in assigned or m not in graph.module2node:
            continue
        try:
            g = _describe_group(graph, m, names, order)
        except HRankError as e:  # Torch-Pruning cannot follow this conv's channels: report, don't crash
            g = Group((name,), m.out_channels, False, str(e))
        if name not in g.members:  # defensive: the root must be one of its own members
            g = Group((name,) + g.members, g.channels, False, g.reason or "root missing from its group")
        assigned.update(g.members)
        groups.append(g)
    return groups


_UNMAPPED = ("removing its channels changes what the network computes: an op or layer that reads them depends "
             "on their positions or their number in a way the trace does not see (e.g. a flatten after a permute "
             "to channels-last, a weight-standardized conv), found by pruning it on a copy")


_FAILS = ("removing its channels makes the network fail to run (a channel count the trace cannot see, e.g. read "
          "from another tensor's shape), found by pruning it on a copy")


def verify_groups(model: nn.Module, groups: Sequence[Group], example_input: torch.Tensor) -> list[Group]:
    """``groups`` with every prunable group whose physical removal breaks the invariant marked not prunable.

    The trace can map channels wrongly through ops it takes for others (``x.permute(0, 2, 3, 1).flatten(1)``
    into a Linear: Torch-Pruning assumes channels-first). A trial prunes every prunable group at once on a copy
    of the model (every other channel) and compares it with the masked model, as ``apply_plan`` does; a
    mismatch is traced to one group by bisection, which is marked, and the trial repeats. One trial when
    nothing is wrong; the model is not modified."""
    from hrank.prune import CHECK_TOLERANCE, _culprit, _mismatch, _sub_plan

    out = list(groups)
    live = [i for i, g in enumerate(out) if g.prunable and g.channels // max(g.blocks, 1) >= 2]
    if not live:
        return out
    x = example_input
    arch = getattr(model, "hrank_arch", None)
    while live:  # each round ends the check or marks one more group
        trial = [PlanGroup(list(out[i].members), out[i].channels, 0.5, _every_other(out[i]), out[i].blocks)
                 for i in live]
        plan = Plan(arch, None, list(x.shape[1:]), "trial", "groups", "mean", {}, trial)
        rel = _mismatch(model, plan, x, strict=True)
        if rel is None or rel <= CHECK_TOLERANCE:  # None: a failure of the model itself, apply_plan reports it
            break
        bad = _culprit(model, plan, x)
        if bad is None:  # no single group explains it: apply_plan reports what fails
            break
        i = next(i for i in live if out[i].members == tuple(bad.members))
        alone = _mismatch(model, _sub_plan(plan, [bad]), x)
        out[i] = dataclasses.replace(out[i], prunable=False, reason=_UNMAPPED if alone != math.inf else _FAILS)
        live.remove(i)
    return out


def _every_other(group: Group) -> list[int]:
    """Half of a group's channels, alternating within each of its blocks (a wrong mapping cannot hide)."""
    size = group.channels // max(group.blocks, 1)
    return [i for i in range(group.channels) if (i % size) % 2 == 0]


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
    blocks: int = 1

    @property
    def width(self) -> int:
        return len(self.kept)

    def to_json(self) -> dict:
        d = {"members": list(self.members), "channels": self.channels, "rate": self.rate,
             "width": self.width, "kept": list(self.kept)}
        if self.blocks > 1:
            d["blocks"] = self.blocks
        return d

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> PlanGroup:
        return PlanGroup([str(m) for m in d["members"]], int(d["channels"]), float(d["rate"]),
                         [int(i) for i in d["kept"]], int(d.get("blocks", 1)))

    def block_counts(self) -> list[int]:
        """Channels kept in each of the group's ``blocks`` equal blocks."""
        size = self.channels // self.blocks
        return [sum(1 for i in self.kept if i // size == b) for b in range(self.blocks)]


@dataclass
class Plan:
    """Kept output channels per conv (indices into the *unpruned* conv), grouped by coupling; JSON-ready.

    ``coupling`` is ``"groups"`` (dependency-consistent; physical or mask) or ``"independent"`` (each conv
    alone, as HRank's masks; mask mode only). ``skipped`` lists the convs the spec rated that stay unpruned,
    each with the reason (``{"conv": ..., "reason": ...}``).
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
    skipped: list[dict] = field(default_factory=list)

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
            "skipped": [dict(s) for s in self.skipped],
            "layers": self.layers,
        }

    @staticmethod
    def from_json(d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or d.get("format") != PLAN_FORMAT:
            raise HRankError("not an hrank plan (missing format: hrank.plan)")
        version = d.get("version", 0)
        if not is_json_int(version):
            raise HRankError(f"malformed plan: version must be an integer, got {describe_json(version)}")
        if version > PLAN_VERSION:
            raise HRankError(f"plan format version {version} is newer than this hrank supports "
                             f"({PLAN_VERSION})")
        input_size = _input_size(d.get("input_size"))
        try:
            plan = Plan(d.get("arch"), d.get("num_classes"), input_size,
                        str(d.get("criterion", "hrank")), str(d["coupling"]), str(d.get("width_rule", "mean")),
                        dict(d.get("spec") or {}), [PlanGroup.from_json(g) for g in d["groups"]],
                        d.get("scores_fingerprint"), d.get("scores_digest"),
                        str(d.get("hrank_version", "")), dict(d.get("meta") or {}),
                        [{"conv": str(s["conv"]), "reason": str(s["reason"])} for s in d.get("skipped") or []])
        except (KeyError, TypeError, ValueError) as e:
            raise HRankError(f"malformed plan: {_error_line(e)}") from None
        if plan.coupling not in ("groups", "independent"):
            raise HRankError(f"malformed plan: unknown coupling {plan.coupling!r}")
        for g in plan.groups:
            if len(set(g.kept)) != len(g.kept) or any(not 0 <= i < g.channels for i in g.kept) or not g.kept:
                raise HRankError(f"malformed plan: group {g.members[0]} keeps invalid channels")
            if g.blocks < 1 or g.channels % g.blocks or len(set(g.block_counts())) != 1:
                raise HRankError(f"malformed plan: group {g.members[0]} keeps unequal channels in its "
                                 f"{g.blocks} blocks")
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
            raise HRankError(f"cannot read plan {path}: {_error_line(e)}") from None
        try:
            return Plan.from_json(data)
        except HRankError as e:  # say which file
            raise HRankError(f"{path}: {e}") from None

    def summary(self) -> str:
        """One line: coupling, groups pruned, channels kept, convs skipped."""
        total = sum(g.channels * len(g.members) for g in self.groups)
        kept = sum(g.width * len(g.members) for g in self.groups)
        skipped = f", {len(self.skipped)} rated conv(s) skipped" if self.skipped else ""
        return (f"{self.coupling} plan for {self.arch or 'a custom model'}: {len(self.pruned_groups())} of "
                f"{len(self.groups)} groups pruned, {kept}/{total} conv filters kept{skipped}")

    def skipped_lines(self, limit: int | None = None) -> list[str]:
        """``conv: reason`` for every skipped conv (the first ``limit``, then a count)."""
        rows = [f"{s['conv']}: {s['reason']}" for s in self.skipped]
        if limit is not None and len(rows) > limit:
            rows = rows[:limit] + [f"... and {len(rows) - limit} more"]
        return rows


_MAX_INPUT_DIM = 65536  # per dimension of a plan's input_size
_MAX_INPUT_ELEMS = 2 ** 28  # one example input of this many float32 elements is 1 GiB


def _input_size(v: Any) -> list[int]:
    """A plan's ``input_size``: a short list of positive integers whose example input fits in memory."""
    what = f"malformed plan: input_size must be a list of positive integers (e.g. [3, 32, 32]), got {describe_json(v)}"
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 8:
        raise HRankError(what)
    dims = []
    for x in v:
        if isinstance(x, (float, np.floating)) and float(x).is_integer():
            x = int(x)
        if isinstance(x, np.integer):
            x = int(x)
        if not is_json_int(x) or x < 1:
            raise HRankError(f"malformed plan: input_size must be a list of positive integers, got {describe_json(x)} "
                             f"in it")
        dims.append(x)
    if max(dims) > _MAX_INPUT_DIM or math.prod(dims) > _MAX_INPUT_ELEMS:
        raise HRankError(f"malformed plan: input_size {'x'.join(map(str, dims))} is too large (at most "
                         f"{_MAX_INPUT_DIM} per dimension and {_MAX_INPUT_ELEMS} elements)")
    return dims


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
                      what: str, blocks: int = 1) -> list[int] | None:
    """Kept channels of one group (None: the rate prunes something but no member has scores).

    With ``blocks`` > 1 the ``int(rate * C)`` filters are rounded down to a multiple of ``blocks`` and each
    block drops the same number, its lowest-scored channels (scores are compared within a block).
    """
    n = num_pruned(rate, channels)
    if n >= channels:
        raise HRankError(f"{what} would lose all {channels} channels (rate {rate:g}); lower the rates")
    per_block = n // blocks
    if per_block == 0:
        return list(range(channels))
    scored = [scores[m] for m in members if m in scores]
    if not scored:
        return None
    mean = np.mean(np.stack(scored), axis=0)
    size = channels // blocks
    kept: list[int] = []
    for b in range(blocks):
        kept += [b * size + i for i in select_kept(mean[b * size:(b + 1) * size], per_block)]
    return kept


def make_plan(model: nn.Module, scores_or_ranks: Any, spec: Spec | str | Mapping[str, float], *,
              criterion: str = "hrank", coupling: str = "groups", width_rule: str = "mean",
              example_input: torch.Tensor | None = None, groups: Sequence[Group] | None = None) -> Plan:
    """Choose kept output channels for every conv the spec names (and the convs coupled with them).

    ``scores_or_ranks``: a ``Ranks`` (``.scores``, ``.fingerprint``, ``.arch``) or a mapping conv name ->
    per-filter scores (higher = keep). ``coupling="groups"`` gives one kept set per coupled group, by the
    mean of its members' scores, with the group's rate from ``width_rule`` over the rates its members have
    in the spec (members the spec does not name do not vote). ``coupling="independent"`` selects every
    conv alone, as HRank's masks do; such a plan is only valid in mask mode. The model is not modified.

    Partial specs: a group the spec reaches only through patterns is skipped (left whole, listed in
    ``plan.skipped`` with the reason) when it cannot be pruned, has no scores, contains a conv the spec
    ignores, or does not run; a conv the spec names exactly is an error in those cases instead.
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
    channels = conv_names(model)
    for conv in spec.rates:
        if conv not in channels:
            raise HRankError(f"spec names layer {conv!r}, which {label} does not have")
    scores = _checked_scores(raw_scores, channels, label)
    x = default_example_input(model) if example_input is None else example_input
    skipped: list[dict] = []

    def skip_or_fail(convs: Sequence[str], reason: str, what: str) -> None:
        named = [c for c in convs if c in spec.exact]
        if named:
            raise HRankError(f"cannot prune {what}: {reason}")
        skipped.extend({"conv": c, "reason": reason} for c in convs)

    plan_groups: list[PlanGroup] = []
    if coupling == "independent":
        order = _order_key(model)
        for conv in sorted(spec.rates, key=order):
            rate = spec.rates[conv]
            kept = _select_for_group([conv], channels[conv], rate, scores, f"layer {conv}")
            if kept is None:
                skip_or_fail([conv], "no scores for its filters (no rank point)", conv)
                kept = list(range(channels[conv]))
            plan_groups.append(PlanGroup([conv], channels[conv], rate, kept))
    else:
        found = list(groups) if groups is not None else verify_groups(model, find_groups(model, x), x)
        covered = {m for g in found for m in g.members}
        for conv in spec.rates:
            if conv not in covered and num_pruned(spec.rates[conv], channels[conv]) > 0:
                skip_or_fail([conv], "does not run in the forward pass", conv)
        rule = WIDTH_RULES[width_rule]
        for g in found:
            rated = [m for m in g.members if m in spec.rates]
            if not rated:
                continue
            rate = rule([spec.rates[m] for m in rated])
            what = f"group {g.members[0]}" + (f" (+{len(g.members) - 1} coupled)" if len(g.members) > 1 else "")
            whole = PlanGroup(list(g.members), g.channels, rate, list(range(g.channels)))
            if num_pruned(rate, g.channels) == 0:
                if g.prunable:  # an unprunable group stays out of the plan (its members may differ in width)
                    plan_groups.append(whole)
                continue
            ignored = [m for m in g.members if m in spec.ignored]
            if ignored:
                reason = "ignored" if set(ignored) >= set(rated) else f"coupled with ignored {ignored[0]}"
                skip_or_fail(rated, reason, what)
                plan_groups.append(whole)
                continue
            if not g.prunable:
                skip_or_fail(rated, g.reason, what)
                continue
            kept = _select_for_group(g.members, g.channels, rate, scores, what, g.blocks)
            if kept is None:
                skip_or_fail(rated, "no scores for its filters (no rank point)", what)
                kept = whole.kept
            plan_groups.append(PlanGroup(list(g.members), g.channels, rate, kept, g.blocks))

    num_classes = None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        num_classes = linears[-1].out_features
    used = {m for g in plan_groups for m in g.members if m in scores}
    return Plan(arch, num_classes, list(x.shape[1:]), criterion, coupling, width_rule, spec.to_json(), plan_groups,
                fingerprint, _scores_digest({k: scores[k] for k in used}), skipped=skipped)
