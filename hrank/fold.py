"""BatchNorm folded into the conv before it: the deployment form of a (pruned) CNN.

In eval mode a BatchNorm after a conv is an affine map per channel, so it can be merged into the conv's
weight and bias and vanish from the graph (one op and one pass over the activations fewer). The graph is found
with torch.fx and each pair merged with torch's own ``fuse_conv_bn_eval``; a pair is folded only when the fold
is exact: the conv's output feeds the BatchNorm alone, neither module is called anywhere else, the types are
plain ``ConvNd``/``BatchNormNd`` of the same dimension, and the BatchNorm uses running statistics. The folded
model is then run beside the original on a seeded random batch and must agree; otherwise nothing is returned.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from hrank.errors import HRankError
from hrank.modelcopy import copy_model

# conv type -> the BatchNorm types it folds with (exact types: a subclass may change forward)
_PAIRS: dict[type, tuple[type, ...]] = {
    nn.Conv1d: (nn.BatchNorm1d,),
    nn.Conv2d: (nn.BatchNorm2d, nn.SyncBatchNorm),
    nn.Conv3d: (nn.BatchNorm3d,),
}
FOLD_RTOL = 1e-4  # relative L2 between the folded and the original output (float32 rounding is ~1e-7)


@dataclass
class FoldResult:
    """The folded copy, which BatchNorms went into which conv, and the BatchNorms left as they were."""

    model: nn.Module
    folded: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> conv name
    kept: list[str] = field(default_factory=list)  # BatchNorms that could not be folded exactly
    max_rel_diff: float = 0.0

    def describe(self) -> str:
        left = f", {len(self.kept)} left as they were ({', '.join(self.kept[:3])}{'…' if len(self.kept) > 3 else ''})"
        return f"{len(self.folded)} BatchNorm folded into the conv before it" + (left if self.kept else "")


def _bn_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-12))


def fold_batchnorm(model: nn.Module, example: torch.Tensor, *, rtol: float = FOLD_RTOL) -> FoldResult:
    """A copy of ``model`` in eval mode with every exactly foldable BatchNorm merged into its conv.

    ``example`` is one input batch (shape and device; its values do not matter): the folded copy must give the
    original's output on a seeded random batch of that shape within ``rtol`` (relative L2), else HRankError.
    The model must be traceable by torch.fx (HRankError otherwise); the caller's model is never changed.
    """
    work = copy_model(model).eval()
    try:
        gm = fx.symbolic_trace(work)
    except Exception as e:
        raise HRankError(f"cannot fold BatchNorm: torch.fx cannot trace the model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    folded: dict[str, str] = {}
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or len(node.args) != 1 or node.kwargs:
            continue
        prev = node.args[0]
        if not isinstance(prev, fx.Node) or prev.op != "call_module" or len(prev.users) != 1:
            continue
        conv = modules[prev.target]
        if type(bn) not in _PAIRS.get(type(conv), ()) or calls[prev.target] != 1 or calls[node.target] != 1:
            continue
        if bn.running_mean is None or bn.running_var is None or conv.out_channels != bn.num_features:
            continue
        fused = fuse_conv_bn_eval(conv, bn)
        parent, _, attr = prev.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, fused)
        node.replace_all_uses_with(prev)
        gm.graph.erase_node(node)
        folded[node.target] = prev.target
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    kept = [n for n in _bn_layers(work) if n not in folded]

    g = torch.Generator().manual_seed(0)
    x = torch.randn(example.shape, generator=g).to(example.device, example.dtype)
    try:
        with torch.no_grad():
            ref, got = work(x), gm(x)
    except Exception as e:
        raise HRankError(f"cannot fold BatchNorm: the folded model does not run ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:160] if str(e) else ''})") from None
    if not (isinstance(ref, torch.Tensor) and isinstance(got, torch.Tensor)) or ref.shape != got.shape:
        raise HRankError("cannot fold BatchNorm: the model's output is not one tensor of the same shape")
    diff = _rel_l2(got, ref)
    if not diff <= rtol:
        raise HRankError(f"folding BatchNorm changed the output (relative L2 {diff:.2e} > {rtol:g}); not folded")
    return FoldResult(gm, folded, kept, diff)
