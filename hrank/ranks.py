"""HRank filter scores: the average matrix rank of each filter's output feature maps, in one pass per batch.

HRank (Lin et al., CVPR 2020) scores a filter by the mean rank of its H x W output maps over g images,
measured after the activation (``docs/ranks.md``; ``../shared/docs/hrank-reference.md`` §1-2). This module:

* computes those ranks exactly as ``torch.linalg.matrix_rank`` defines them, batched, without a per-map
  Python loop or host sync, in memory-bounded chunks spread over all CPU cores (section 1);
* finds where each conv is scored: the registry's HRank points, or automatically the first activation
  (module or functional) its output reaches through norms, pooling, residual adds and concatenations,
  else its own BN or conv output (section 2);
* runs the model once per batch with hooks on every point at once, on one process or a DDP group (section 3);
* stores the result as one ``.npz`` file with JSON metadata and imports the official rank folders (section 4).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from hrank import models
from hrank.chip import CHIP_METHODS, _chip_4d
from hrank.data import ImageSet, Normalization, crop_flip, draw_augmentation, normalize
from hrank.errors import HRankError
from hrank.io import _error_line, atomic_save_with, describe_json, is_json_int, require_file
from hrank.layers import is_conv
from hrank.models.base import RankPoint

__all__ = ["Ranks", "compute_ranks", "compute_scores", "SCORES", "find_rank_points", "matrix_ranks",
           "model_fingerprint", "METHODS"]

METHODS = ("gram", "svd")
_EPS32 = float(torch.finfo(torch.float32).eps)
# Elements (maps x H x W) per chunk: bounds the extra memory of the rank computation (docs/ranks.md).
_CHUNK_ELEMS = {"cpu": 1 << 20, "cuda": 1 << 23}
_CUDA_BATCHED_EIGH_MAX = 32  # the largest matrix size cuSOLVER's syevjBatched handles
_AUGMENT_PADDING = 4  # HRank: RandomCrop(32, padding=4) + RandomHorizontalFlip


# ==================================================================================================
# 1. Exact batched matrix ranks
# ==================================================================================================

def _gram_ranks(a: torch.Tensor) -> torch.Tensor:
    """Ranks of float32 maps ``a`` (n, H, W) with matrix_rank's default tolerance, via float64 Gram matrices.

    Why this is exact (details in docs/ranks.md): all-zero rows/columns carry only zero singular values,
    so the rank is at most k = the smaller number of nonzero lines. The Gram matrix G on that side is
    formed in float64, where products of float32 values are exact. matrix_rank counts singular values
    sigma > sigma_max * max(H, W) * eps32, i.e. eigenvalues lambda = sigma^2 of G above
    tau = lambda_max * (max(H, W) * eps32)^2. A Cholesky factorisation of G - tau_U I (tau_U from
    trace(G) >= lambda_max, zero lines lifted out of the way) succeeds only if every eigenvalue exceeds
    tau_U >= tau: the map then has rank k, certified at a third of the cost of an SVD. The rest (maps
    whose rank is below k) get float64 eigenvalues of G and are counted against tau itself. Maps holding
    NaN/inf get -1.
    """
    n, h, w = a.shape
    f2 = (max(h, w) * _EPS32) ** 2
    magnitude = a.abs()  # amax of |a| finds zero lines ~3x faster than (a != 0).any()
    row_max, col_max = magnitude.amax(2), magnitude.amax(1)
    del magnitude
    finite = torch.isfinite(row_max).all(1)  # NaN/inf propagate into the maxima: a cheap check
    if not bool(finite.all()):
        a = torch.where(finite[:, None, None], a, 0.0)
    rows = (row_max > 0).sum(1)
    cols = (col_max > 0).sum(1)
    if h == w:  # per map, the Gram matrix of the side with fewer nonzero lines
        b = torch.where((rows < cols)[:, None, None], a, a.transpose(1, 2))
        lines = torch.minimum(rows, cols)
    elif h < w:
        b, lines = a, rows
    else:
        b, lines = a.transpose(1, 2), cols
    b = b.to(torch.float64)
    gram = b @ b.transpose(1, 2)  # (n, k, k) with k = min(H, W): rows of b are the chosen lines
    del b
    diag = gram.diagonal(dim1=1, dim2=2)
    bound = diag.sum(1)  # trace = ||A||_F^2 >= lambda_max
    shifted = gram.clone()
    shifted.diagonal(dim1=1, dim2=2).add_(torch.where(diag == 0, bound[:, None], 0.0) - (bound * f2)[:, None])
    info = torch.linalg.cholesky_ex(shifted).info
    del shifted
    ranks = lines.clone()
    redo = ((info != 0) & (lines > 0)).nonzero().squeeze(1)
    if redo.numel():
        try:
            sub = gram[redo]
            if sub.is_cuda and sub.shape[-1] > _CUDA_BATCHED_EIGH_MAX:
                # cuSOLVER's batched eigensolver stops at 32x32; above it torch solves one matrix per launch,
                # which made 56x56 maps ~1000x slower than the forward pass. LAPACK on the host is faster.
                ev = torch.linalg.eigvalsh(sub.cpu()).to(sub.device)
            else:
                ev = torch.linalg.eigvalsh(sub)
            ranks[redo] = (ev > ev[:, -1:] * f2).sum(1)
        except torch.linalg.LinAlgError:  # no convergence (pathological input): use the reference itself
            ranks[redo] = torch.linalg.matrix_rank(a[redo])
    return ranks.masked_fill_(~finite, -1)


def _svd_ranks(a: torch.Tensor) -> torch.Tensor:
    """The reference: ``torch.linalg.matrix_rank`` with its default tolerance on float32 maps."""
    finite = torch.isfinite(a).flatten(1).all(1)
    if not bool(finite.all()):
        a = torch.where(finite[:, None, None], a, 0.0)
    return torch.linalg.matrix_rank(a).masked_fill_(~finite, -1)


_RANK_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gram": _gram_ranks, "svd": _svd_ranks}


def _pieces(maps: torch.Tensor, chunk_elems: int, min_pieces: int) -> list[torch.Tensor]:
    """Split 4-D maps (B, C, H, W) into row-major pieces of at most ``chunk_elems`` elements (>= 1 map).

    Pieces are views; each is copied to a contiguous (n, H, W) float32 block only when it is processed,
    so a channel slice of an activation is never copied whole.
    """
    b, c, h, w = maps.shape
    per_piece = max(1, min(chunk_elems // (h * w), math.ceil(b * c / max(1, min_pieces))))
    if per_piece >= c:
        step = per_piece // c
        return [maps[i:i + step] for i in range(0, b, step)]
    return [maps[i, j:j + per_piece] for i in range(b) for j in range(0, c, per_piece)]


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """``workers`` threads that each run torch single-threaded; the process's thread setting is kept.

    Batched LAPACK calls loop over the batch on one core, so chunks run in parallel on these threads.
    Each worker must itself use one intra-op thread: nested OpenMP teams make the many small
    reductions of a chunk 20-40x slower, worst on a busy machine. torch's thread count is per thread
    (OpenMP) but also kept in a process-wide default, which is restored once every worker is set.
    """
    main_threads = torch.get_num_threads()
    ready = threading.Barrier(workers + 1, timeout=60)

    def init() -> None:
        torch.get_num_threads()  # initialise this thread's settings from the default first...
        torch.set_num_threads(1)  # ...then make it single-threaded
        ready.wait()

    pool = ThreadPoolExecutor(workers, thread_name_prefix="hrank-rank", initializer=init)
    for _ in range(workers):  # each submit starts one worker, which waits in init until all are set
        pool.submit(int)
    ready.wait()
    torch.set_num_threads(main_threads)
    return pool


def _ranks_4d(maps: torch.Tensor, method: str, chunk_elems: int, pool: Executor | None,
              workers: int, act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Ranks (B, C) int64 of maps (B, C, H, W), chunk by chunk, the chunks spread over ``pool``.

    ``act`` (a rank point's activation) is applied to each chunk first, so it costs no full-size copy.
    """
    fn = _RANK_FNS[method]
    h, w = maps.shape[-2:]

    def run(piece: torch.Tensor) -> torch.Tensor:
        if act is not None:
            piece = act(piece)
        return fn(piece.reshape(-1, h, w).to(torch.float32))

    pieces = _pieces(maps, chunk_elems, 2 * workers if pool is not None else 1)
    results = list(pool.map(run, pieces)) if pool is not None else [run(p) for p in pieces]
    return torch.cat(results).view(maps.shape[:2])


def _resolve_method(method: str, device: torch.device) -> str:
    if method not in METHODS:
        raise HRankError(f"unknown rank method {method!r}; choose one of {', '.join(METHODS)}")
    if method == "gram" and device.type == "mps":  # no float64 on MPS
        return "svd"
    return method


def matrix_ranks(maps: torch.Tensor, *, method: str = "gram", chunk_elems: int | None = None,
                 workers: int | None = None) -> torch.Tensor:
    """Rank of every H x W matrix in ``maps`` (..., H, W), as ``torch.linalg.matrix_rank`` on float32 maps.

    ``method="gram"`` (default) is the fast exact path of ``docs/ranks.md``; ``"svd"`` calls matrix_rank
    itself. Work is done in chunks of at most ``chunk_elems`` elements (bounded extra memory) and, on CPU,
    on ``workers`` threads (default: torch's thread count), because batched LAPACK calls use one core.
    Returns int64 ranks of shape ``maps.shape[:-2]`` on the maps' device; a map holding NaN or inf gets -1.
    """
    if maps.dim() < 2:
        raise HRankError(f"matrix_ranks needs maps of shape (..., H, W), got {tuple(maps.shape)}")
    lead = maps.shape[:-2]
    h, w = maps.shape[-2:]
    if maps.numel() == 0:
        return torch.zeros(lead, dtype=torch.int64, device=maps.device)
    method = _resolve_method(method, maps.device)
    x = maps.reshape(1, -1, h, w) if maps.dim() != 4 else maps
    chunk = chunk_elems or _CHUNK_ELEMS.get(maps.device.type, _CHUNK_ELEMS["cuda"])
    workers = workers or torch.get_num_threads()
    if maps.device.type == "cpu":
        with _cpu_pool(workers) as pool:
            out = _ranks_4d(x, method, chunk, pool, workers)
    else:
        out = _ranks_4d(x, method, chunk, None, 1)
    return out.reshape(lead)


# ==================================================================================================
# 2. Rank points: registry defaults, automatic discovery
# ==================================================================================================

# The trace's node kinds (docs/ranks.md, "Rank points"): a conv; an activation module, whose output is the point;
# a functional activation, whose point is its producer module's output with the activation applied by hrank;
# a normalization (followed; the fallback point when it directly follows the conv); other channel-preserving
# operations (followed); anything else, which ends the search on that path.
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign,
                nn.LogSigmoid, nn.Tanhshrink, nn.Threshold)
# Elementwise activation modules of other libraries, by class name (timm.layers.activations and _me, ...).
_ACT_NAMES = frozenset({"Swish", "SwishMe", "MemoryEfficientSwish", "SiLU", "Mish", "MishMe", "HardSwish",
                        "HardSwishMe", "HardSigmoid", "HardSigmoidMe", "HardMish", "HardMishMe", "GELU", "GELUTanh",
                        "QuickGELU", "Sigmoid", "Tanh", "ReLU", "ReLU6", "Hardswish", "Hardsigmoid", "LeakyReLU",
                        "PReLU", "ELU", "SELU", "CELU", "Softplus"})
_NORM_MODULES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)
# Modules that are the identity in eval mode (stochastic depth, drop path) besides Identity and Dropout.
_DROP_NAMES = frozenset({"StochasticDepth", "DropPath", "DropBlock2d", "DropBlock", "DropConnect"})
_PASS_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.MaxPool2d, nn.AvgPool2d)
_ADD_FUNCS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
              torch.Tensor.__iadd__}
_CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
_SAME_FUNCS = {torch.Tensor.contiguous, torch.Tensor.clone, torch.clone, F.dropout, F.dropout2d, F.max_pool2d,
               F.avg_pool2d}
_NORM_FUNCS = {F.batch_norm, F.group_norm, F.instance_norm, F.layer_norm, F.local_response_norm}

# Functional activations: function -> (activation name, its float parameters as (position, keyword, default)).
_P = tuple[tuple[int, str, float], ...]
_SLOPE: _P = ((1, "negative_slope", 0.01),)
_ALPHA: _P = ((1, "alpha", 1.0),)
_FUNC_ACTS: dict[Callable, tuple[str, _P]] = {
    **{f: ("relu", ()) for f in (F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_)},
    F.relu6: ("relu6", ()),
    **{f: ("hardtanh", ((1, "min_val", -1.0), (2, "max_val", 1.0))) for f in (F.hardtanh, F.hardtanh_)},
    F.silu: ("silu", ()),
    F.gelu: ("gelu", ()),  # approximate="tanh": gelu_tanh (_func_act)
    F.hardswish: ("hardswish", ()),
    F.hardsigmoid: ("hardsigmoid", ()),
    **{f: ("sigmoid", ()) for f in (torch.sigmoid, torch.sigmoid_, torch.Tensor.sigmoid, torch.Tensor.sigmoid_,
                                     torch.special.expit)},
    **{f: ("tanh", ()) for f in (torch.tanh, torch.tanh_, torch.Tensor.tanh, torch.Tensor.tanh_)},
    **{f: ("leaky_relu", _SLOPE) for f in (F.leaky_relu, F.leaky_relu_)},
    **{f: ("elu", _ALPHA) for f in (F.elu, F.elu_)},
    **{f: ("selu", ()) for f in (F.selu, torch.selu, torch.selu_)},
    **{f: ("celu", _ALPHA) for f in (F.celu, torch.celu, torch.celu_)},
    F.mish: ("mish", ()),
    F.softplus: ("softplus", ((1, "beta", 1.0), (2, "threshold", 20.0))),
    F.logsigmoid: ("logsigmoid", ()),
}

# What RankPoint.act names: the activation hrank applies to the hooked output before ranking.
_ACT_APPLY: dict[str, tuple[int, Callable[..., torch.Tensor]]] = {
    "relu": (0, F.relu), "relu6": (0, F.relu6), "silu": (0, F.silu), "gelu": (0, F.gelu),
    "gelu_tanh": (0, lambda x: F.gelu(x, approximate="tanh")), "hardswish": (0, F.hardswish),
    "hardsigmoid": (0, F.hardsigmoid), "sigmoid": (0, torch.sigmoid), "tanh": (0, torch.tanh), "mish": (0, F.mish),
    "selu": (0, F.selu), "logsigmoid": (0, F.logsigmoid),
    "leaky_relu": (1, lambda x, slope: F.leaky_relu(x, slope)), "elu": (1, lambda x, alpha: F.elu(x, alpha)),
    "celu": (1, lambda x, alpha: F.celu(x, alpha)), "softplus": (2, lambda x, beta, th: F.softplus(x, beta, th)),
    "hardtanh": (2, lambda x, lo, hi: F.hardtanh(x, lo, hi)),
}


def _act_fn(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation that ``RankPoint.act`` names ("relu", "leaky_relu:0.1", ...), or a one-line HRankError."""
    name, *params = str(spec).split(":")
    entry = _ACT_APPLY.get(name)
    try:
        values = [float(p) for p in params]
    except ValueError:
        entry = None
    if entry is None or len(values) != entry[0]:
        known = ", ".join(n + "".join(f":<p{i + 1}>" for i in range(k)) for n, (k, _) in _ACT_APPLY.items())
        raise HRankError(f"unknown rank point activation {spec!r}; known: {known}")
    fn = entry[1]
    return (lambda x: fn(x, *values)) if values else fn


def _func_act(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """The ``RankPoint.act`` spec of a functional activation call, None if ``func`` is not one."""
    entry = _FUNC_ACTS.get(func)
    if entry is None:
        return None
    name, params = entry
    values = [kwargs.get(key, args[pos] if len(args) > pos else default) for pos, key, default in params]
    if func is F.gelu and kwargs.get("approximate", args[1] if len(args) > 1 else "none") == "tanh":
        return "gelu_tanh"
    try:
        values = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    if name == "hardtanh" and values == [0.0, 6.0]:
        return "relu6"
    return name + "".join(f":{v!r}" for v in values)


def _is_activation(m: nn.Module) -> bool:
    """An elementwise activation module: torch's (ReLU ... Softplus) or one of the same name (timm's Swish...)."""
    return isinstance(m, _ACT_MODULES) or type(m).__name__ in _ACT_NAMES


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, _NORM_MODULES) or "Norm" in type(m).__name__


def _is_norm_unit(m: nn.Module) -> bool:
    """A normalization module with children that are only activations, dropouts or identities (timm's
    BatchNormAct2d, GroupNormAct, ...): traced as one node, its output being the activated one."""
    if not _is_norm(m) or next(m.children(), None) is None:
        return False
    return all(_is_activation(c) or isinstance(c, (nn.Identity, nn.modules.dropout._DropoutNd))
               or type(c).__name__ in _DROP_NAMES for c in list(m.modules())[1:])


def _unwrap(model: nn.Module) -> nn.Module:
    """The wrapped module of DataParallel / DistributedDataParallel, else the model itself."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


@dataclass
class _Node:
    """One traced operation: a leaf module call (or norm unit) or a torch function outside leaf modules."""

    kind: str  # conv | act | funcact | norm | pass | other
    label: str  # for messages: "Conv2d layer1.0.conv1", "add", ...
    module: str | None  # a module node: hookable when its output is one tensor
    call: int
    inputs: list[tuple[int, int]]  # (producer node, channel offset of that input in this node's output)
    channels: int | None
    hookable: bool = False
    act: str | None = None  # funcact: the RankPoint.act spec


class _Tracer(TorchFunctionMode):
    """Records the data flow of one forward pass: which operation produced and consumed each tensor.

    Leaf modules and norm units are single nodes (seen through module hooks); torch functions called
    outside them (residual adds, concatenations, functional activations) are nodes too. Tensors are keyed
    by ``id`` and kept alive for the trace, so ids cannot be reused; in-place ops re-key their tensor.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.nodes: list[_Node] = []
        self.producer: dict[int, int] = {}
        self.keep: list[torch.Tensor] = []
        self.calls: dict[str, int] = {}
        self.in_leaf = 0
        self.pending: list[tuple[str, list[int], list[torch.Tensor]]] = []
        self.handles: list[Any] = []

    def __enter__(self):
        units: list[str] = []
        for name, m in self.model.named_modules():
            if any(name.startswith(u + ".") for u in units):
                continue  # inside a norm unit: the unit is the node
            unit = _is_norm_unit(m)
            if unit:
                units.append(name)
            if unit or next(m.children(), None) is None:
                self.handles.append(m.register_forward_pre_hook(self._pre(name), with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post(name)))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    @staticmethod
    def _tensors(obj: Any) -> list[torch.Tensor]:
        if isinstance(obj, torch.Tensor):
            return [obj]
        if isinstance(obj, (list, tuple)):
            return [t for o in obj for t in _Tracer._tensors(o)]
        if isinstance(obj, dict):
            return [t for o in obj.values() for t in _Tracer._tensors(o)]
        return []

    def _add(self, node: _Node, outputs: list[torch.Tensor]) -> None:
        self.nodes.append(node)
        for t in outputs:
            self.producer[id(t)] = len(self.nodes) - 1
            self.keep.append(t)

    def _pre(self, name: str):
        def hook(module, args, kwargs):
            self.in_leaf += 1
            ins = self._tensors((args, kwargs))
            self.pending.append((name, [self.producer.get(id(t), -1) for t in ins], ins))
        return hook

    def _post(self, name: str):
        def hook(module, args, output):
            self.in_leaf -= 1
            _, srcs, ins = self.pending.pop()
            call = self.calls.get(name, 0)
            self.calls[name] = call + 1
            outs = self._tensors(output)
            first = outs[0] if outs else None
            same = (first is not None and first.dim() == 4 and len(ins) == 1 and ins[0].shape == first.shape)
            if is_conv(module):
                kind = "conv"
            elif _is_activation(module):
                kind = "act"
            elif _is_norm_unit(module):
                kind = ("act" if any(_is_activation(c) for c in module.modules()) else "norm") if same else "other"
            elif _is_norm(module):
                kind = "norm" if same else "other"
            elif isinstance(module, _PASS_MODULES) or type(module).__name__ in _DROP_NAMES:
                kind = "pass"
            else:
                kind = "other"
            channels = first.shape[1] if first is not None and first.dim() >= 2 else None
            node = _Node(kind, f"{type(module).__name__} {name}", name, call, [(s, 0) for s in srcs if s >= 0],
                         channels, hookable=isinstance(output, torch.Tensor))
            self._add(node, outs)
        return hook

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.in_leaf:
            return out
        outs = self._tensors(out)
        ins = self._tensors((args, kwargs))
        srcs = [self.producer.get(id(t), -1) for t in ins]
        if not outs or all(s < 0 for s in srcs):
            return out
        name = getattr(func, "__name__", str(func))
        first = outs[0]
        inputs = [(s, 0) for s in srcs if s >= 0]
        kind, act = "other", None
        if func in _FUNC_ACTS:
            act = _func_act(func, args, kwargs)
            if act is not None and srcs[0] >= 0:
                kind, inputs = "funcact", [(srcs[0], 0)]
        elif func in _SAME_FUNCS:
            kind = "pass"
        elif func in _NORM_FUNCS:
            kind = "norm" if first.dim() == 4 and ins[0].shape == first.shape else "other"
        elif func in _ADD_FUNCS:
            # a residual add keeps channel j in place unless it broadcasts over channels
            kind = "pass" if all(t.dim() == first.dim() and t.shape[1:] == first.shape[1:] for t in ins) \
                and first.dim() >= 2 else "other"
        elif func in _CAT_FUNCS:
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            parts = self._tensors(args[0] if args else kwargs.get("tensors", ()))
            if first.dim() >= 2 and dim in (1, 1 - first.dim()):
                kind = "pass"
                inputs, offset = [], 0
                for t in parts:
                    s = self.producer.get(id(t), -1)
                    if s >= 0:
                        inputs.append((s, offset))
                    offset += t.shape[1]
        channels = first.shape[1] if first.dim() >= 2 else None
        self._add(_Node(kind, name, None, 0, inputs, channels, act=act), outs)
        return out


def _trace(model: nn.Module, example: torch.Tensor) -> _Tracer:
    """Run ``model`` once on ``example`` in eval mode under a tracer (train/eval state restored)."""
    modes = {m: m.training for m in model.modules()}
    tracer = _Tracer(model)
    try:
        model.eval()
        with torch.no_grad(), tracer:
            _forward_first(model, example)
    finally:
        for m, t in modes.items():
            m.training = t
    return tracer


def _discover(model: nn.Module, convs: Sequence[str], example: torch.Tensor
              ) -> tuple[dict[str, RankPoint], dict[str, str], list[str]]:
    """Automatic rank points (the rule of docs/ranks.md): for each conv, the first activation its output reaches.

    The search follows normalizations, Identity, Dropout/drop path, max/average pooling, contiguous/clone,
    residual adds (channel j stays channel j) and channel concatenations (channels shift by the offset: the
    point is then a slice) and stops at anything else. The earliest activation reached is the point: an
    activation module's output, or for a functional activation (``F.relu(bn(x))``), the output of the module
    that produced its input with ``act`` set, hrank applying the activation before ranking. Without one the
    point is the normalization module directly after the conv, else the conv itself ("no activation": those
    convs are returned too). A conv that runs more than once per pass, or not at all, gets no point; the
    reason is returned for the message.
    """
    tracer = _trace(model, example)
    nodes = tracer.nodes
    consumers: dict[int, list[tuple[int, int]]] = {}
    for i, node in enumerate(nodes):
        for src, offset in node.inputs:
            consumers.setdefault(src, []).append((i, offset))
    conv_nodes: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.kind == "conv":
            conv_nodes.setdefault(node.module or "", []).append(i)

    def point(at: int, lo: int, hi: int, act: str | None = None) -> RankPoint:
        node = nodes[at]
        assert node.module is not None
        channels = None if (lo, hi) == (0, node.channels) else (lo, hi)
        call = node.call if tracer.calls.get(node.module, 1) > 1 else None
        return RankPoint(node.module, channels, call=call, act=act)

    points: dict[str, RankPoint] = {}
    reasons: dict[str, str] = {}
    linear: list[str] = []
    for conv in convs:
        found = conv_nodes.get(conv, [])
        if not found:
            reasons[conv] = "does not run in the forward pass"
            continue
        if len(found) > 1:
            reasons[conv] = f"runs {len(found)} times per forward pass"
            continue
        start = found[0]
        width = nodes[start].channels or 0
        stack, seen = [(start, 0, width)], set()
        best: tuple[int, RankPoint] | None = None
        while stack:
            at, lo, hi = stack.pop()
            for nxt, offset in consumers.get(at, []):
                key = (nxt, lo + offset, hi + offset)
                if key in seen or (best is not None and nxt > best[0]):
                    continue
                seen.add(key)
                node = nodes[nxt]
                if node.kind == "act" and node.hookable:
                    best = (nxt, point(*key))
                elif node.kind == "funcact" and nodes[at].hookable:  # the producer is a module: hook it
                    best = (nxt, point(at, lo, hi, node.act))
                elif node.kind in ("pass", "norm"):
                    stack.append(key)
        if best is not None:
            points[conv] = best[1]
            continue
        norm = next((i for i, _ in consumers.get(start, []) if nodes[i].kind == "norm" and nodes[i].hookable), None)
        at = norm if norm is not None else start
        points[conv] = point(at, 0, nodes[at].channels or width)
        linear.append(conv)
    return points, reasons, linear


def _example_input(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    """An input for tracing: the one given, the registry's input size, or the first that runs of 32/64/224."""
    if example_input is not None:
        return example_input[:2]
    device = _model_device(model)
    arch = getattr(model, "hrank_arch", None)
    if arch in models.names():
        return torch.zeros((2, *models.get_spec(arch).input_size), device=device)
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    channels = first.in_channels if first is not None else 3
    for size in (32, 64, 224):
        x = torch.zeros(2, channels, size, size, device=device)
        try:
            with torch.no_grad():
                _trace(model, x)
            return x
        except Exception:  # wrong size for this model: try the next one
            continue
    raise HRankError(f"could not run {type(model).__name__} on a 2x{channels}xSxS input (S = 32, 64, 224); "
                     "pass example_input")


def _conv_names(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if is_conv(m)]


def _resolve_points(model: nn.Module, points: Mapping[str, str | RankPoint] | None, convs: Sequence[str] | None,
                    example_input: torch.Tensor | None
                    ) -> tuple[dict[str, RankPoint], dict[str, str], list[str]]:
    """Points for the convs to rank: user ``points`` first, then the registry's, then automatic discovery.

    Returns the points, the convs left without one (with the reason) and the discovered points that have
    no activation after them (ranked before any nonlinearity: reported in ``Ranks.meta``).
    """
    all_convs = _conv_names(model)
    if not all_convs:
        raise HRankError(f"{type(model).__name__} has no Conv2d layers: nothing to rank")
    conv_set = set(all_convs)
    modules = dict(model.named_modules())
    user: dict[str, RankPoint] = {}
    for conv, p in (points or {}).items():
        if conv not in conv_set:
            raise HRankError(f"points: {conv!r} is not a Conv2d of the model")
        rp = RankPoint(p) if isinstance(p, str) else p
        if not isinstance(rp, RankPoint):
            raise HRankError(f"points[{conv!r}] must be a module name or a RankPoint, got {type(p).__name__}")
        if rp.module not in modules:
            raise HRankError(f"points[{conv!r}]: the model has no module {rp.module!r}")
        if rp.act is not None:
            _act_fn(rp.act)
        user[conv] = rp
    arch = getattr(model, "hrank_arch", None)
    registry: dict[str, RankPoint] = {}
    if arch in models.names():
        registry = {c: p for c, p in models.rank_points(model).items() if c in conv_set and p.module in modules}
    if convs is not None:
        wanted = list(dict.fromkeys(convs))
        bad = [c for c in wanted if c not in conv_set]
        if bad:
            raise HRankError(f"convs: {bad[0]!r} is not a Conv2d of the model")
    else:
        wanted = list(registry) if registry else all_convs
        wanted += [c for c in user if c not in wanted]
    found = {c: user.get(c) or registry.get(c) for c in wanted}
    missing = [c for c, p in found.items() if p is None]
    reasons: dict[str, str] = {}
    linear: list[str] = []
    if missing:
        auto, reasons, linear = _discover(model, missing, _example_input(model, example_input))
        found.update(auto)
    resolved = {c: p for c, p in found.items() if p is not None}
    if reasons:
        listing = "; ".join(f"{c}: {r}" for c, r in list(reasons.items())[:5])
        more = f" (+{len(reasons) - 5} more)" if len(reasons) > 5 else ""
        if convs is not None or not resolved:
            raise HRankError(f"no rank point for {len(reasons)} conv(s), give points= for them: {listing}{more}")
        warnings.warn(f"{len(reasons)} conv(s) are not ranked (no single rank point): {listing}{more}",
                      stacklevel=3)
    return resolved, reasons, linear


def find_rank_points(model: nn.Module, convs: Sequence[str] | None = None, *,
                     example_input: torch.Tensor | None = None) -> dict[str, RankPoint]:
    """Where each conv's filters are scored: the registry's HRank points, else found automatically.

    For a registry model (``hrank.models.create``) these are HRank's points (post-add ReLU for a residual
    block's last conv, DenseNet's next BN-ReLU slice, GoogLeNet's per-branch slices...). For any other
    model each conv gets the first activation (module or functional: ReLU, SiLU, GELU, Hardswish,
    sigmoid, ...) its output reaches through normalizations, pooling, residual adds and concatenations,
    else its own BN output, else its own output (the rule table of docs/ranks.md), found by tracing one
    forward pass of ``example_input`` (default: a zero batch of a size the model accepts). Convs that run
    more than once per pass (shared weights) or not at all are listed in a warning and left out; if
    ``convs`` names them explicitly, that is an error instead.
    """
    model = _unwrap(model)
    return _resolve_points(model, None, convs, example_input)[0]


# ==================================================================================================
# 3. compute_ranks: one forward pass per batch, hooks on every point, DDP reduction
# ==================================================================================================

def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _imageset_batches(data: ImageSet, num_images: int, batch_size: int, *, seed: int, augment: bool,
                      norm: Normalization, device: torch.device, rank: int, world: int
                      ) -> tuple[Iterator[torch.Tensor], int]:
    """Batches of this process's share of ``num_images`` images drawn in a seeded order.

    The draw and every image's crop/flip depend only on ``seed``, and each process takes a contiguous
    block of the draw, so any number of processes and any batch size rank the same images.
    """
    if data.images.dim() != 4:
        raise HRankError(f"images must be (N, C, H, W), got shape {tuple(data.images.shape)}")
    if len(data) == 0:
        raise HRankError(f"dataset {data.name or ''} is empty".replace("  ", " "))
    if len(data) < num_images:
        raise HRankError(f"dataset {data.name or ''} has {len(data)} images, fewer than num_images={num_images}; "
                         "lower num_images".replace("  ", " "))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data), generator=g)[:num_images]
    oy, ox, flip = draw_augmentation(num_images, g, _AUGMENT_PADDING)
    lo, hi = num_images * rank // world, num_images * (rank + 1) // world

    def gen() -> Iterator[torch.Tensor]:
        for start in range(lo, hi, batch_size):
            sl = slice(start, min(start + batch_size, hi))
            imgs = data.images[order[sl].to(data.images.device)].to(device)
            if augment:
                imgs = crop_flip(imgs, oy[sl], ox[sl], flip[sl], _AUGMENT_PADDING)
            yield normalize(imgs, norm)

    return gen(), math.ceil((hi - lo) / batch_size)


def _iterable_batches(data: Iterable, num_images: int, device: torch.device, rank: int, world: int,
                      total: int | None = None) -> tuple[Iterator[torch.Tensor], int | None]:
    """Images from an iterable of (images, labels) batches (or image tensors), up to this process's share."""
    share = num_images * (rank + 1) // world - num_images * rank // world

    def gen() -> Iterator[torch.Tensor]:
        taken = 0
        for item in data:
            if taken >= share:
                return
            x = item[0] if isinstance(item, (tuple, list)) else item
            if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise HRankError(f"data batches must be float image tensors (N, C, H, W), got {shape}")
            x = x[: share - taken]
            taken += x.shape[0]
            yield x.to(device, non_blocking=True)
        if taken < share:
            raise HRankError(f"data yielded {taken} images, fewer than the {share} needed "
                             f"(num_images={num_images}{f' over {world} processes' if world > 1 else ''})")

    size = getattr(data, "batch_size", None)  # a DataLoader knows its batch count; a plain iterable may not
    if total is None and isinstance(size, int) and size > 0:
        total = math.ceil(share / size)
    return gen(), total


def _collated(loader: Iterable) -> Iterator[Any]:
    """The batches of a DataLoader over a user's Dataset; items it cannot batch are a one-line error."""
    try:
        yield from loader
    except TypeError as e:
        if "collate" not in str(e):
            raise
        line = (str(e).strip().splitlines() or [""])[0]
        raise HRankError("dataset items must be image tensors (C, H, W) or (image, label) pairs; "
                         f"{line[:200]}") from None


def _data_source(data: Any, num_images: int, batch_size: int, rank: int, world: int
                 ) -> tuple[Iterable, int | None]:
    """``data`` (not an ImageSet) as an iterable of batches for ``_iterable_batches``, with its batch count if known.

    A float tensor (N, C, H, W) or a map-style Dataset is indexable: it is cut into batches of ``batch_size``
    (no shuffle, no augmentation) from this process's contiguous block of its first ``num_images`` items, as
    for an ImageSet, so any number of processes ranks the same images. An IterableDataset is batched by a
    DataLoader; a DataLoader or any other iterable of batches is used as it is (each process reads its share
    from its own iterable, e.g. with a DistributedSampler).
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

    lo, hi = num_images * rank // world, num_images * (rank + 1) // world
    total = math.ceil((hi - lo) / batch_size)
    if isinstance(data, torch.Tensor):
        if data.dim() != 4 or not data.is_floating_point():
            raise HRankError("a tensor of images must be float (N, C, H, W), already normalized; got "
                             f"{str(data.dtype).replace('torch.', '')} of shape {tuple(data.shape)}")
        if len(data) < num_images:
            raise HRankError(f"the image tensor has {len(data)} images, fewer than num_images={num_images}; "
                             "lower num_images")
        return (data[i:min(i + batch_size, hi)] for i in range(lo, hi, batch_size)), total
    if isinstance(data, IterableDataset):
        return _collated(DataLoader(data, batch_size=batch_size)), None
    if isinstance(data, Dataset):
        try:
            size = len(data)  # type: ignore[arg-type]
        except TypeError:  # a map-style dataset without __len__: only the first num_images are read
            size = None
        if size is not None and size < num_images:
            raise HRankError(f"dataset {type(data).__name__} has {size} items, fewer than num_images={num_images}; "
                             "lower num_images")
        return _collated(DataLoader(Subset(data, range(lo, hi)), batch_size=batch_size, shuffle=False)), total
    if isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise HRankError("data must be an ImageSet, a float image tensor (N, C, H, W), a Dataset, a DataLoader or "
                         f"an iterable of image batches, got {type(data).__name__}")
    return data, None


@dataclass
class _Group:
    """All convs scored on one call of one module; ranks are computed once on the hull of their slices."""

    module: str
    call: int | None
    act: str | None
    convs: list[tuple[str, RankPoint]]
    lo: int = 0
    hi: int = 0
    sums: torch.Tensor | None = None
    spatial: tuple[int, int] | None = None
    fired: bool = False
    chip: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # CHIP score sums per conv slice


def _check_input(model: nn.Module, shape: Sequence[int], x: torch.Tensor | None = None) -> None:
    """One-line errors for images that cannot fit the model (channels; registry input size).

    A first conv that reads other than the images' channels is only an error when the model fails on ``x`` (one
    image; zeros of ``shape`` when not given): stems such as TResNet's space-to-depth (3 -> 48 channels)
    rearrange the image before the first conv."""
    if len(shape) != 4:
        raise HRankError(f"images must be (N, C, H, W), got shape {tuple(shape)}")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if first is not None and shape[1] != first.in_channels:
        from hrank.plan import _Preserved

        x = torch.zeros((1, *shape[1:]), device=_model_device(model)) if x is None else x[:1]
        try:
            with _Preserved(model, x), torch.no_grad():  # modes, buffers and RNG as they were
                model.eval()
                model(x)
        except Exception:  # the model cannot take these images: say why in the terms of the likely cause
            raise HRankError(f"images have {shape[1]} channels, the model's first conv expects "
                             f"{first.in_channels}") from None
    arch = getattr(model, "hrank_arch", None)
    if arch in models.names():
        spec = models.get_spec(arch)
        if spec.dataset == "cifar" and tuple(shape[1:]) != tuple(spec.input_size):
            raise HRankError(f"images are {'x'.join(map(str, shape[1:]))}, {arch} expects "
                             f"{'x'.join(map(str, spec.input_size))}")


class _Hooks:
    """Forward hooks on every rank point: rank each point's maps as the forward pass produces them."""

    def __init__(self, model: nn.Module, points: dict[str, RankPoint], method: str, chunk: int,
                 pool: Executor | None, workers: int, kinds: Sequence[str] = ("rank",),
                 chip_method: str = "gram") -> None:
        self.modules = dict(model.named_modules())
        self.method, self.chunk, self.pool, self.workers = method, chunk, pool, workers
        self.kinds, self.chip_method = tuple(kinds), chip_method  # "rank" (HRank) and/or "chip" (CHIP)
        by_key: dict[tuple[str, int | None, str | None], _Group] = {}
        for conv, p in points.items():
            key = (p.module, p.call, p.act)
            by_key.setdefault(key, _Group(p.module, p.call, p.act, [])).convs.append((conv, p))
        self.groups = list(by_key.values())
        self.acts = {g.act: _act_fn(g.act) for g in self.groups if g.act is not None}
        self.calls: dict[str, int] = {}
        self.handles = []
        per_module: dict[str, list[_Group]] = {}
        for grp in self.groups:
            per_module.setdefault(grp.module, []).append(grp)
        for name, mine in per_module.items():
            self.handles.append(self.modules[name].register_forward_hook(self._hook(name, mine)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def start_batch(self) -> None:
        self.calls.clear()
        for grp in self.groups:
            grp.fired = False

    def end_batch(self) -> None:
        for grp in self.groups:
            if not grp.fired:
                call = f" (call {grp.call})" if grp.call is not None else ""
                raise HRankError(f"rank point {grp.module}{call} of {grp.convs[0][0]} did not run in the "
                                 "forward pass")

    def _hook(self, name: str, mine: list[_Group]):
        def hook(module, args, output):
            n = self.calls.get(name, 0)
            self.calls[name] = n + 1
            for grp in mine:
                if grp.call is None and n > 0:
                    raise HRankError(f"module {name} runs more than once per forward pass; give the rank point "
                                     f"of {grp.convs[0][0]} a call index (RankPoint(..., call=i))")
                if (grp.call or 0) == n:
                    self._rank(grp, output)
        return hook

    def _first(self, grp: _Group, output: torch.Tensor) -> None:
        """First batch: check every conv's slice against its filter count; fix the hull and the sizes."""
        width = output.shape[1]
        for conv, p in grp.convs:
            lo, hi = p.channels or (0, width)
            need = self.modules[conv].out_channels
            if not (0 <= lo < hi <= width) or hi - lo != need:
                what = f"channels {lo}:{hi} of the" if p.channels else "the"
                raise HRankError(f"rank point of {conv}: {what} {width}-channel output of {grp.module} does "
                                 f"not match its {need} filters")
        grp.lo = min((p.channels or (0, width))[0] for _, p in grp.convs)
        grp.hi = max((p.channels or (0, width))[1] for _, p in grp.convs)
        grp.sums = torch.zeros(grp.hi - grp.lo, dtype=torch.float64, device=output.device)
        grp.spatial = (int(output.shape[2]), int(output.shape[3]))
        if "chip" in self.kinds:  # CHIP's matrix is one conv's channels: one sum per distinct slice
            for _, p in grp.convs:
                lo, hi = p.channels or (0, width)
                grp.chip.setdefault((lo, hi), torch.zeros(hi - lo, dtype=torch.float64, device=output.device))

    def _rank(self, grp: _Group, output: Any) -> None:
        if not isinstance(output, torch.Tensor) or output.dim() != 4:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise HRankError(f"rank point {grp.module} of {grp.convs[0][0]} must output (N, C, H, W) feature "
                             f"maps, got {shape}")
        if grp.sums is None:
            self._first(grp, output)
        act = self.acts.get(grp.act) if grp.act is not None else None
        if "rank" in self.kinds:
            ranks = _ranks_4d(output.detach()[:, grp.lo:grp.hi], self.method, self.chunk, self.pool, self.workers,
                              act)
            if bool((ranks < 0).any()):  # -1 marks a map with NaN/inf values
                self._non_finite(grp)
            grp.sums += ranks.sum(0, dtype=torch.float64)
        for (lo, hi), sums in grp.chip.items():
            chip = _chip_4d(output.detach()[:, lo:hi], self.chip_method, self.chunk, self.pool, self.workers, act)
            total = chip.sum(0)
            if not bool(torch.isfinite(total).all()):  # NaN marks an image with NaN/inf values
                self._non_finite(grp)
            sums += total
        grp.fired = True

    @staticmethod
    def _non_finite(grp: _Group) -> None:
        raise HRankError(f"non-finite activations (NaN/inf) at {grp.module}, the rank point of "
                         f"{grp.convs[0][0]}; check the checkpoint and the input normalization")


def _shape_str(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape))


def _forward_first(model: nn.Module, x: torch.Tensor) -> None:
    """The first batch (and the trace before it): a model that cannot take these images fails with one line,
    not a traceback."""
    try:
        model(x)
    except HRankError:
        raise
    except Exception as e:  # the model's own forward (a second required input, a shape it cannot take)
        raise HRankError(f"model failed on images of shape {tuple(x.shape)} ({_error_line(e)}); hrank runs "
                         f"models that take one batch of images") from None


def compute_ranks(model: nn.Module, data: ImageSet | torch.Tensor | Iterable, *, num_images: int = 500,
                  batch_size: int = 128, device: torch.device | str | None = None,
                  points: Mapping[str, str | RankPoint] | None = None, progress: bool = True,
                  augment: bool = True, seed: int = 0,
                  normalization: Normalization | str | dict | None = None, convs: Sequence[str] | None = None,
                  method: str = "gram", chunk_elems: int | None = None, workers: int | None = None) -> Ranks:
    """Score every filter by the mean rank of its feature maps over ``num_images`` images (HRank).

    ``data`` is an ImageSet (uint8 images: drawn in a ``seed``-ed order, cropped/flipped as HRank did
    when ``augment``, normalized with ``normalization``: default the registry's preset, else "cifar"), or
    already normalized float images, taken in order and not augmented (seed/augment/normalization do not
    apply): a tensor (N, C, H, W) or a map-style torch Dataset of image tensors or (image, label) pairs,
    both cut into batches of ``batch_size``; an IterableDataset (batched the same way); a DataLoader or
    any iterable of image batches or (images, labels) batches. Fewer images than ``num_images`` is an
    error. The model runs once per batch in eval
    mode without gradients, with hooks on every rank point (``find_rank_points``; ``points`` overrides
    entries, ``convs`` restricts the convs); its train/eval state and device are restored afterwards and
    the hooks are always removed. Ranks are exact (``matrix_ranks``, ``method``); per-filter sums are
    float64; extra memory is bounded by ``chunk_elems`` (docs/ranks.md). Under ``torch.distributed``
    each process ranks a share of the images and the sums are all-reduced, so every process returns the
    same result. From an ImageSet, tensor or Dataset the share is a contiguous block of the first
    ``num_images`` images, so the result equals a single process's; from a DataLoader or other iterable
    each process takes the first ``num_images / world`` images its own iterable yields (shard it, e.g.
    with a DistributedSampler).
    """
    return _compute(model, data, ("hrank",), num_images=num_images, batch_size=batch_size, device=device,
                    points=points, progress=progress, augment=augment, seed=seed, normalization=normalization,
                    convs=convs, method=method, chunk_elems=chunk_elems, workers=workers)["hrank"]


SCORES = ("hrank", "chip")  # the data criteria computed by the hooks: mean map rank, CHIP nuclear-norm drop


def compute_scores(model: nn.Module, data: ImageSet | torch.Tensor | Iterable, criteria: Sequence[str] = SCORES, *,
                   num_images: int = 500, batch_size: int = 128, device: torch.device | str | None = None,
                   points: Mapping[str, str | RankPoint] | None = None, progress: bool = True, augment: bool = True,
                   seed: int = 0, normalization: Normalization | str | dict | None = None,
                   convs: Sequence[str] | None = None, method: str = "gram", chip_method: str = "gram",
                   chunk_elems: int | None = None, workers: int | None = None) -> dict[str, Ranks]:
    """Several data criteria in one pass: ``{"hrank": Ranks, "chip": Ranks}`` for the names in ``criteria``.

    Everything is as in ``compute_ranks`` (same images, rank points, hooks, chunks, thread pool, DDP
    all-reduce); the "hrank" result equals ``compute_ranks``'s. "chip" scores a filter by CHIP's channel
    independence (Sui et al., NeurIPS 2021): the mean over images of ``||A||_* - ||A with the filter's row
    zeroed||_*``, A the conv's C x HW post-activation maps of one image (``hrank.chip``; ``chip_method``
    "gram" is the exact fast path, "svd" the direct SVDs). Higher = more important for both.
    """
    criteria = tuple(dict.fromkeys(criteria))
    bad = [c for c in criteria if c not in SCORES]
    if bad or not criteria:
        raise HRankError(f"unknown data criterion {bad[0] if bad else None!r}; choose from {', '.join(SCORES)}")
    if chip_method not in CHIP_METHODS:
        raise HRankError(f"unknown CHIP method {chip_method!r}; choose one of {', '.join(CHIP_METHODS)}")
    return _compute(model, data, criteria, num_images=num_images, batch_size=batch_size, device=device,
                    points=points, progress=progress, augment=augment, seed=seed, normalization=normalization,
                    convs=convs, method=method, chip_method=chip_method, chunk_elems=chunk_elems, workers=workers)


def _compute(model: nn.Module, data: Any, criteria: tuple[str, ...], *, num_images: int, batch_size: int,
             device: torch.device | str | None, points: Mapping[str, str | RankPoint] | None, progress: bool,
             augment: bool, seed: int, normalization: Normalization | str | dict | None, convs: Sequence[str] | None,
             method: str, chunk_elems: int | None, workers: int | None, chip_method: str = "gram"
             ) -> dict[str, Ranks]:
    """compute_ranks / compute_scores: one pass per batch, the hooks computing every criterion asked for."""
    if num_images < 1:
        raise HRankError(f"num_images must be >= 1, got {num_images}")
    if batch_size < 1:
        raise HRankError(f"batch size must be >= 1, got {batch_size}")
    model = _unwrap(model)
    if not _conv_names(model):
        raise HRankError(f"{type(model).__name__} has no Conv2d layers: nothing to rank")
    home = _model_device(model)
    dev = torch.device(device) if device is not None else home
    method = _resolve_method(method, dev)
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    if num_images < world:
        raise HRankError(f"num_images={num_images} is smaller than the number of processes ({world})")
    arch = getattr(model, "hrank_arch", None)
    if isinstance(data, ImageSet):
        _check_input(model, (1, *data.images.shape[1:]))
        norm = Normalization.get(normalization if normalization is not None else
                                 (models.get_spec(arch).normalization if arch in models.names() else None))
        batches, total = _imageset_batches(data, num_images, batch_size, seed=seed, augment=augment, norm=norm,
                                           device=dev, rank=rank, world=world)
        data_meta: dict[str, Any] = {"dataset": data.name, "augment": augment, "seed": seed,
                                     "normalization": norm.to_json()}
    else:
        source, known = _data_source(data, num_images, batch_size, rank, world)
        batches, total = _iterable_batches(source, num_images, dev, rank, world, known)
        data_meta = {"dataset": type(data).__name__, "augment": None, "seed": None, "normalization": None}

    n_workers = (workers or torch.get_num_threads()) if dev.type == "cpu" else 1
    chunk = chunk_elems or _CHUNK_ELEMS.get(dev.type, _CHUNK_ELEMS["cuda"])
    modes = {m: m.training for m in model.modules()}
    pool = _cpu_pool(n_workers) if dev.type == "cpu" else None
    hooks: _Hooks | None = None
    resolved: dict[str, RankPoint] = {}
    reasons: dict[str, str] = {}
    linear: list[str] = []
    count = 0
    started = time.perf_counter()
    bar = None
    failed = False
    try:
        if dev != home:
            model.to(dev)
        model.eval()
        if progress and rank == 0:
            from tqdm.auto import tqdm
            bar = tqdm(total=total, desc="ranking", unit="batch")
        with torch.no_grad(), _full_float32(dev):
            first_shape: tuple[int, ...] = ()
            for index, x in enumerate(batches):
                if hooks is None:
                    _check_input(model, x.shape, x)
                    first_shape = tuple(x.shape)
                    resolved, reasons, linear = _resolve_points(model, points, convs, x)
                    kinds = tuple("rank" if c == "hrank" else c for c in criteria)
                    hooks = _Hooks(model, resolved, method, chunk, pool, n_workers, kinds, chip_method)
                    hooks.start_batch()
                    _forward_first(model, x)
                else:
                    if tuple(x.shape[1:]) != first_shape[1:]:  # would mix map sizes in the means, or fail in a conv
                        raise HRankError(f"data batch {index} (counting from 0) has images of shape "
                                         f"{_shape_str(x.shape[1:])}, the first batch "
                                         f"{_shape_str(first_shape[1:])}; every batch must have the same image shape")
                    hooks.start_batch()
                    model(x)
                hooks.end_batch()
                count += x.shape[0]
                if bar is not None:
                    bar.update(1)
        if hooks is None:
            raise HRankError("no images to rank")
    except BaseException:
        failed = True
        raise
    finally:
        if hooks is not None:
            hooks.remove()
        if pool is not None:
            pool.shutdown()
        if bar is not None:
            bar.close()
        for m, t in modes.items():
            m.training = t
        if dev != home:
            model.to(home)
        if distributed:  # every process must reach the same collectives, failed or not
            _agree(failed, dev)
    assert hooks is not None
    groups = hooks.groups
    total_count = _all_reduce(groups, count, dev) if distributed else count
    scores: dict[str, np.ndarray] = {}
    chip: dict[str, np.ndarray] = {}
    spatial: dict[str, tuple[int, int]] = {}
    for grp in groups:
        assert grp.sums is not None and grp.spatial is not None
        mean = (grp.sums / total_count).cpu().numpy()
        for conv, p in grp.convs:
            lo, hi = p.channels or (grp.lo, grp.hi)
            scores[conv] = mean[lo - grp.lo:hi - grp.lo].copy()
            spatial[conv] = grp.spatial
            if grp.chip:
                chip[conv] = (grp.chip[p.channels or (0, grp.hi)] / total_count).cpu().numpy()
    order = list(resolved)
    meta = {"source": "computed", "method": method, "batch_size": batch_size, "world_size": world,
            "device": dev.type, "seconds": round(time.perf_counter() - started, 3), "torch": torch.__version__,
            "unranked": reasons, "no_activation": [c for c in order if c in linear],
            "model_convs": _model_convs(model), **data_meta}
    common = (int(total_count), {c: spatial[c] for c in order}, {c: resolved[c] for c in order},
              model_fingerprint(model), arch if arch in models.names() else None)
    out: dict[str, Ranks] = {}
    if "hrank" in criteria:
        out["hrank"] = Ranks({c: scores[c] for c in order}, *common, meta)
    if "chip" in criteria:
        out["chip"] = Ranks({c: chip[c] for c in order}, *common,
                            {**meta, "criterion": "chip", "method": chip_method,
                             "score": "mean nuclear-norm drop when the filter's row of the C x HW maps is zeroed"})
    return out


@contextlib.contextmanager
def _full_float32(device: torch.device) -> Iterator[None]:
    """No TF32 while ranking on CUDA: TF32 convolutions round the feature maps to 10 mantissa bits, noise that
    lifts singular values a float32 map does not have above the rank threshold (the ranks of a map computed in
    float32 are what is scored, on every device). The flags are restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _agree(failed: bool, device: torch.device) -> None:
    """All processes learn whether any failed, so none waits forever in the reduction of the sums."""
    dist = torch.distributed
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([1.0 if failed else 0.0], dtype=torch.float64, device=on)
    dist.all_reduce(flag)
    if flag.item() > 0 and not failed:
        raise HRankError("rank computation failed on another process (see its error)")


def _all_reduce(groups: list[_Group], count: int, device: torch.device) -> int:
    """Sum every process's per-filter rank sums and image counts (one collective); returns the total count."""
    dist = torch.distributed
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    vec = torch.cat([t.to(on) for grp in groups for t in (grp.sums, *grp.chip.values()) if t is not None]
                    + [torch.tensor([float(count)], dtype=torch.float64, device=on)])
    dist.all_reduce(vec)
    offset = 0
    for grp in groups:
        assert grp.sums is not None
        size = grp.sums.numel()
        grp.sums = vec[offset:offset + size].to(device)
        offset += size
        for key, t in grp.chip.items():  # CHIP sums (when asked for) follow their group's rank sums
            grp.chip[key] = vec[offset:offset + t.numel()].to(device)
            offset += t.numel()
    return int(round(vec[-1].item()))


# ==================================================================================================
# 4. Ranks: the artefact (npz + JSON), validation, the official HRank rank folders
# ==================================================================================================

def model_fingerprint(model: nn.Module) -> str:
    """A stable hash of the names, types and weight shapes (not values) of all conv, linear and BN layers.

    Two models with the same fingerprint accept the same ranks file; it survives device moves and
    training, and changes when any layer is added, renamed or resized (e.g. by pruning).
    """
    h = hashlib.sha256()
    for name, m in _unwrap(model).named_modules():
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._NormBase)):
            w = getattr(m, "weight", None)
            shape = tuple(w.shape) if isinstance(w, torch.Tensor) else (getattr(m, "num_features", None),)
            h.update(f"{name}|{type(m).__name__}|{shape}\n".encode())
    return h.hexdigest()[:16]


def _model_convs(model: nn.Module) -> dict[str, int]:
    return {name: m.out_channels for name, m in model.named_modules() if is_conv(m)}


def _is_point_json(p: Any) -> bool:
    """Whether ``p`` is a RankPoint as ``RankPoint.to_json`` writes it."""
    if not isinstance(p, dict) or not isinstance(p.get("module"), str):
        return False
    ch, call, act = p.get("channels"), p.get("call"), p.get("act")
    if ch is not None and not (isinstance(ch, list) and len(ch) == 2 and all(is_json_int(n) and n >= 0 for n in ch)):
        return False
    return (call is None or (is_json_int(call) and call >= 0)) and (act is None or isinstance(act, str))


_FORMAT = "hrank-ranks"
_VERSION = 1


@dataclass
class Ranks:
    """Mean feature-map rank per filter for a set of convs, and how it was measured.

    ``scores[conv]`` has one float64 entry per output filter. ``points`` says where each conv was scored,
    ``spatial`` the H x W of its maps, ``fingerprint``/``arch`` which model, ``meta`` the rest (source
    "computed" or "official", seed, augmentation, normalization, timing, convs left unranked and why).
    """

    scores: dict[str, np.ndarray]
    num_images: int
    spatial: dict[str, tuple[int, int]] = field(default_factory=dict)
    points: dict[str, RankPoint] = field(default_factory=dict)
    fingerprint: str = ""
    arch: str | None = None
    meta: dict = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write one ``.npz``: the score arrays plus a JSON header (no pickles), atomically."""
        names = list(self.scores)
        header = {"format": _FORMAT, "version": _VERSION, "convs": names, "num_images": self.num_images,
                  "spatial": {c: list(v) for c, v in self.spatial.items()},
                  "points": {c: p.to_json() for c, p in self.points.items()},
                  "fingerprint": self.fingerprint, "arch": self.arch, "meta": self.meta}
        arrays = {f"s{i}": np.asarray(self.scores[c], dtype=np.float64) for i, c in enumerate(names)}
        arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_save_with(path, write)

    @classmethod
    def load(cls, path: str | os.PathLike, model: nn.Module | None = None) -> Ranks:
        """Read a file written by ``save``; with ``model``, also ``validate`` that it belongs to that model.

        A damaged header or score array (a field of the wrong type, a score that is not a 1-D array of
        real numbers) is a one-line error naming the file and the field."""
        path = require_file(path, "ranks file")
        not_ranks = f"{path} is not an hrank ranks file (write one with `hrank rank`)"
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(bytes(z["header"]).decode())
                if not isinstance(header, dict):
                    raise HRankError(f"{path}: damaged ranks file: its header is {describe_json(header)}, "
                                     f"not an object")
                if header.get("format") != _FORMAT:
                    raise KeyError("format")
                version = header.get("version", 0)
                if not is_json_int(version):
                    raise HRankError(f"{path}: damaged ranks file: version must be an integer, got "
                                     f"{describe_json(version)}")
                if version > _VERSION:
                    raise HRankError(f"{path} was written by a newer hrank (format version {version})")
                convs = header.get("convs")
                if not isinstance(convs, list) or not all(isinstance(c, str) for c in convs):
                    raise HRankError(f"{path}: damaged ranks file: convs must be a list of conv names, got "
                                     f"{describe_json(convs)}")
                raw = {c: z[f"s{i}"] for i, c in enumerate(convs)}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError):
            raise HRankError(not_ranks) from None
        scores: dict[str, np.ndarray] = {}
        for c, a in raw.items():
            if a.ndim != 1 or a.dtype.kind not in "biuf":
                what = f"a {a.ndim}-d array" if a.ndim != 1 else f"an array of {a.dtype.name}"
                raise HRankError(f"{path}: damaged ranks file: the scores of {c} must be a 1-D array of real "
                                 f"numbers, got {what}")
            scores[c] = a.astype(np.float64)
        num_images = header.get("num_images")
        if isinstance(num_images, float) and num_images.is_integer():
            num_images = int(num_images)
        if not is_json_int(num_images) or num_images < 0:  # 0: weight criteria (hrank.criteria) use no images
            raise HRankError(f"{path}: damaged ranks file: num_images must be a non-negative integer, got "
                             f"{describe_json(num_images)}")
        spatial = header.get("spatial", {})
        if not isinstance(spatial, dict) or not all(
                isinstance(v, list) and len(v) == 2 and all(is_json_int(n) and n >= 0 for n in v)
                for v in spatial.values()):
            raise HRankError(f"{path}: damaged ranks file: spatial must map each conv to its [H, W] map size")
        points: dict[str, RankPoint] = {}
        raw_points = header.get("points", {})
        if not isinstance(raw_points, dict):
            raise HRankError(f"{path}: damaged ranks file: points must map each conv to its rank point, got "
                             f"{describe_json(raw_points)}")
        for c, p in raw_points.items():
            if not _is_point_json(p):
                raise HRankError(f"{path}: damaged ranks file: the rank point of {c} is malformed (expected "
                                 f"{{\"module\": name, \"channels\": [lo, hi] or null, ...}}), got {describe_json(p)}")
            points[c] = RankPoint.from_json(p)
        fingerprint, arch, meta = header.get("fingerprint", ""), header.get("arch"), header.get("meta", {})
        if fingerprint is not None and not isinstance(fingerprint, str):
            raise HRankError(f"{path}: damaged ranks file: fingerprint must be a string, got "
                             f"{describe_json(fingerprint)}")
        if arch is not None and not isinstance(arch, str):
            raise HRankError(f"{path}: damaged ranks file: arch must be a string or null, got {describe_json(arch)}")
        if not isinstance(meta, dict):
            raise HRankError(f"{path}: damaged ranks file: meta must be an object, got {describe_json(meta)}")
        ranked = meta.get("model_convs")
        if ranked is not None and not (isinstance(ranked, dict) and all(is_json_int(n) for n in ranked.values())):
            raise HRankError(f"{path}: damaged ranks file: meta.model_convs must map conv names to filter counts, "
                             f"got {describe_json(ranked)}")
        ranks = cls(scores, num_images, {c: (v[0], v[1]) for c, v in spatial.items()}, points, fingerprint, arch,
                    meta)
        if model is not None:
            ranks.validate(model)
        return ranks

    def validate(self, model: nn.Module) -> None:
        """Raise HRankError unless these ranks fit ``model``: same architecture, every scored conv present
        with as many filters as scores, and no conv that the ranked model lacked. Names the first bad layer."""
        model = _unwrap(model)
        arch = getattr(model, "hrank_arch", None)
        if self.arch and arch and arch != self.arch:
            raise HRankError(f"these ranks are for {self.arch}, not for the {arch} model")
        have = _model_convs(model)
        for conv, s in self.scores.items():
            if conv not in have:
                raise HRankError(f"ranks are for another model: it has no conv {conv}")
            if have[conv] != len(s):
                raise HRankError(f"ranks are for another model: {conv} has {have[conv]} filters, the ranks {len(s)}")
        ranked = self.meta.get("model_convs")
        if ranked and model_fingerprint(model) != self.fingerprint:
            extra = [c for c in have if c not in ranked]
            if extra:
                raise HRankError(f"ranks are for another model: the ranked model had no conv {extra[0]}")
            changed = [c for c in have if ranked[c] != have[c]]
            if changed:
                raise HRankError(f"ranks are for another model: {changed[0]} has {have[changed[0]]} filters, "
                                 f"the ranked model {ranked[changed[0]]}")

    @classmethod
    def from_official(cls, folder: str | os.PathLike, arch: str) -> Ranks:
        """Import an official HRank ``rank_conv/<arch>/`` folder (``rank_conv<k>.npy`` per conv) for any of
        the six architectures, mapping file k to the conv it was measured for (see docs/ranks.md)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise HRankError(f"official rank folder not found: {folder}")
        files = _official_files(arch)
        with torch.device("meta"):
            model = models.create(arch)
        have = _model_convs(model)
        scores: dict[str, np.ndarray] = {}
        for conv, fname in files.items():
            path = folder / fname
            if not path.exists():
                raise HRankError(f"{folder} lacks {fname} (the ranks of {conv}); is it the {arch} folder?")
            try:
                values = np.load(path, allow_pickle=False)
            except EOFError:
                raise HRankError(f"cannot read {path}: the file is empty or truncated") from None
            except (OSError, ValueError) as e:
                raise HRankError(f"cannot read {path}: {e}") from None
            if values.dtype.kind not in "biuf":
                what = "text" if values.dtype.kind in "US" else f"{values.dtype.name} values"
                raise HRankError(f"{path} holds {what}, not real numbers: it is not an official rank file")
            if values.ndim != 1 or len(values) != have[conv]:
                raise HRankError(f"{path} has {values.shape} values, {conv} of {arch} has {have[conv]} filters")
            values = values.astype(np.float64)
            if not np.isfinite(values).all():
                raise HRankError(f"{path} holds values that are not finite (NaN or inf): it is not an official rank "
                                 f"file (ranks are counts)")
            scores[conv] = values
        points = models.rank_points(model)
        spatial = _point_spatial(model, {c: points[c] for c in scores})
        # The shipped files average 6 batches of 128 images (reference README, "surprises" 1).
        return cls(scores, 768, spatial, {c: points[c] for c in scores}, model_fingerprint(model), arch,
                   {"source": "official", "folder": str(folder), "files": files, "model_convs": have,
                    "note": "official HRank rank files: float32 running means over 768 augmented training images"})


def _official_files(arch: str) -> dict[str, str]:
    """conv -> official rank file name, in the official mask order (reference README, 'How entries...')."""
    if arch not in ("vgg_16_bn", "resnet_56", "resnet_110", "densenet_40", "googlenet", "resnet_50"):
        known = [a for a in models.names() if a not in ("resnet_20", "resnet_32", "resnet_44")]
        raise HRankError(f"no official HRank ranks exist for {arch!r}; known: {', '.join(known)}")
    with torch.device("meta"):
        model = models.create(arch)
    if arch == "googlenet":
        from hrank.models.googlenet import ORDER
        files = {"pre_layers.0": "rank_conv1.npy"}
        for k, name in enumerate(ORDER, start=2):
            m = f"inception_{name}"
            files[f"{m}.branch1x1.0"] = f"rank_conv{k}_n1x1.npy"
            files[f"{m}.branch3x3.3"] = f"rank_conv{k}_n3x3.npy"
            files[f"{m}.branch5x5.3"] = f"rank_conv{k}_n5x5.npy"  # one file for both convs of the branch
            files[f"{m}.branch5x5.6"] = f"rank_conv{k}_n5x5.npy"
            files[f"{m}.branch_pool.1"] = f"rank_conv{k}_pool_planes.npy"
        return files
    if arch == "resnet_50":  # mask.py order: per block conv1, conv2, conv3, then block 0's downsample
        order = ["conv1"]
        for name, m in model.named_modules():
            if name.count(".") == 1 and name.startswith("layer"):
                order += [f"{name}.conv1", f"{name}.conv2", f"{name}.conv3"]
                if m.downsample is not None:
                    order.append(f"{name}.downsample.0")
    else:
        order = models.prunable_convs(model)
        if arch == "vgg_16_bn":
            order = order[:12]  # the 13th conv is never pruned and has no file
    return {conv: f"rank_conv{k}.npy" for k, conv in enumerate(order, start=1)}


def _point_spatial(model: nn.Module, points: dict[str, RankPoint]) -> dict[str, tuple[int, int]]:
    """H x W at each point, from one forward pass of a meta-device copy (no memory, no compute)."""
    arch = getattr(model, "hrank_arch", None)
    if arch not in models.names():
        return {}
    sizes: dict[str, tuple[int, int]] = {}
    handles = []
    modules = dict(model.named_modules())

    def record(name: str):
        def hook(module, args, out) -> None:
            sizes.setdefault(name, (int(out.shape[2]), int(out.shape[3])))
        return hook

    for name in {p.module for p in points.values()}:
        handles.append(modules[name].register_forward_hook(record(name)))
    try:
        with torch.no_grad():
            model.eval()(torch.empty((1, *models.get_spec(arch).input_size), device="meta"))
    except Exception:  # an op without a meta kernel: spatial sizes are informational only
        return {}
    finally:
        for h in handles:
            h.remove()
    return {c: sizes[p.module] for c, p in points.items() if p.module in sizes}
