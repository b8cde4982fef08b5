"""Model registry: the six HRank architectures (plus CIFAR ResNet-20/32/44), their facts, checkpoint loading.

Everywhere a registry name is accepted, so is a reference to a model from elsewhere (:mod:`hrank.models.external`):
``torchvision:NAME``, ``timm:NAME``, ``package.module:factory`` or ``path/to/file.py:factory``.
"""

from __future__ import annotations

import numbers
import os
from typing import Any

import torch
from torch import nn

from hrank.errors import HRankError
from hrank.io import load_torch_file
from hrank.models import densenet, external, googlenet, resnet_cifar, resnet_imagenet, vgg
from hrank.models.base import ArchSpec, ChannelPadShortcut, RankPoint

__all__ = [
    "trust",
    "ArchSpec",
    "ChannelPadShortcut",
    "RankPoint",
    "create",
    "names",
    "is_registry",
    "get_spec",
    "rate_entries",
    "prunable_convs",
    "rank_points",
    "load_checkpoint",
    "extract_state_dict",
]

_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add an architecture to the registry (used for the built-ins; available to users too)."""
    _REGISTRY[spec.name] = spec
    return spec


register(ArchSpec("vgg_16_bn", lambda num_classes=10: vgg.VGGCifar(num_classes), "cifar", (3, 32, 32), 10,
                  "cifar", vgg.rate_entries, vgg.rank_points, frozenset({12}),
                  "VGG-16 with BN for CIFAR (13 convs, HRank layout)"))
for _depth in (20, 32, 44, 56, 110):
    register(ArchSpec(f"resnet_{_depth}", resnet_cifar.resnet_cifar(_depth), "cifar", (3, 32, 32), 10, "cifar",
                      resnet_cifar.rate_entries, resnet_cifar.rank_points,
                      description=f"CIFAR ResNet-{_depth}, option-A shortcut"))
register(ArchSpec("densenet_40", lambda num_classes=10: densenet.DenseNetCifar(40, 12, num_classes), "cifar",
                  (3, 32, 32), 10, "cifar", densenet.rate_entries, densenet.rank_points,
                  description="DenseNet-40 (growth 12) for CIFAR"))
register(ArchSpec("googlenet", lambda num_classes=10: googlenet.GoogLeNetCifar(num_classes), "cifar",
                  (3, 32, 32), 10, "cifar", googlenet.rate_entries, googlenet.rank_points,
                  description="GoogLeNet, CIFAR variant"))
register(ArchSpec("resnet_50", lambda num_classes=1000: resnet_imagenet.ResNetImageNet((3, 4, 6, 3), num_classes),
                  "imagenet", (3, 224, 224), 1000, "imagenet", resnet_imagenet.rate_entries,
                  resnet_imagenet.rank_points, description="ResNet-50 for ImageNet (torchvision layout)"))


def names() -> list[str]:
    """Names of all registered architectures."""
    return list(_REGISTRY)


def is_registry(ref: str) -> bool:
    """True when ``ref`` is a registered architecture name (not a ``torchvision:``/``timm:``/``module:factory``
    reference): only those have HRank's hand-written rate entries and rank points."""
    return isinstance(ref, str) and ref in _REGISTRY


def get_spec(ref: str) -> ArchSpec:
    """The facts hrank uses about ``ref``: the registry entry for a name, generic defaults for an external
    reference (see :func:`hrank.models.external.spec`); a one-line error for anything else."""
    if not isinstance(ref, str):
        raise HRankError(f"a model reference is a string, got {type(ref).__name__}")
    if ref in _REGISTRY:
        return _REGISTRY[ref]
    if external.is_external(ref):
        return external.spec(ref)
    raise HRankError(f"unknown model {ref!r}; known models: {', '.join(names())} (or torchvision:NAME, timm:NAME, "
                     f"package.module:factory)")


MAX_CLASSES = 1_000_000  # a classifier wider than this is a typo, and its weights would not fit in memory

# ``module:factory`` references this process was given by its user (a flag, a config, an API call), as opposed to
# read from a file: a file may name one of these, never new code to import (see :func:`create`).
_NAMED_BY_USER: set[str] = set()


def trust(ref: str) -> None:
    """Mark ``ref`` as named by the user, so that files recording it may rebuild it (:func:`create`)."""
    if isinstance(ref, str):
        _NAMED_BY_USER.add(ref)


def create(ref: str, num_classes: int | None = None, *, from_file: bool = False) -> nn.Module:
    """Build the model ``ref`` names (registry name or external reference) with fresh weights.

    The model carries ``hrank_arch = ref`` and ``hrank_num_classes`` so that saved files record what rebuilds it.
    External weights are never downloaded; load them with :func:`load_checkpoint`. ``from_file``: ``ref`` was
    read from a file, which must not choose code to run: a ``module:factory`` reference is built only when the
    user named it in this process (:func:`trust`; the CLI's ``--model``, a run config's ``model``).
    """
    if isinstance(ref, str) and external.runs_code(ref):
        if not from_file:
            trust(ref)
        elif ref not in _NAMED_BY_USER:
            raise HRankError(f"the file says it was built by {ref!r}, which imports and runs code; hrank does not run "
                             f"code a file names: name the model yourself (--model {ref} beside --model-file; "
                             f"models.trust({ref!r}) in Python)")
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
            raise HRankError(f"num_classes must be an integer >= 1, got {num_classes!r}")
        if num_classes > MAX_CLASSES:
            raise HRankError(f"num_classes must be at most {MAX_CLASSES:,}, got {num_classes:,}")
        num_classes = int(num_classes)
    if isinstance(ref, str) and external.is_external(ref):
        model = external.build(ref, num_classes)
    else:
        spec = get_spec(ref)
        num_classes = num_classes or spec.num_classes
        model = spec.builder(num_classes=num_classes)
    model.hrank_arch = ref  # lets later steps find the spec again, and saved files rebuild the model
    model.hrank_num_classes = num_classes
    return model


def _model_and_spec(model_or_name: nn.Module | str) -> tuple[nn.Module, ArchSpec]:
    if isinstance(model_or_name, str):
        return create(model_or_name), get_spec(model_or_name)
    arch = getattr(model_or_name, "hrank_arch", None)
    if arch is None:
        raise HRankError("this model is not from the hrank registry; give rates by layer name instead")
    return model_or_name, get_spec(arch)


def rate_entries(model_or_name: nn.Module | str) -> list[tuple[str, ...]]:
    """HRank's compress_rate order: entry i lists the conv(s) its rate applies to."""
    model, spec = _model_and_spec(model_or_name)
    return spec.rate_entries(model)


def prunable_convs(model_or_name: nn.Module | str) -> list[str]:
    """All convs covered by the compress_rate entries, in HRank order."""
    return [c for entry in rate_entries(model_or_name) for c in entry]


def rank_points(model_or_name: nn.Module | str) -> dict[str, RankPoint]:
    """HRank's hook point (module + channel slice) for each prunable conv that has one."""
    model, spec = _model_and_spec(model_or_name)
    return spec.rank_points(model)


_WRAPPER_KEYS = ("state_dict", "model", "net", "model_state_dict")


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state_dict in a loaded checkpoint (bare, or under state_dict/model/net) and strip ``module.``."""
    sd = obj
    for _ in range(2):  # e.g. {"net": {"state_dict": ...}}
        if isinstance(sd, dict) and not all(isinstance(v, torch.Tensor) for v in sd.values()):
            for key in _WRAPPER_KEYS:
                if key in sd and isinstance(sd[key], dict):
                    sd = sd[key]
                    break
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise HRankError("checkpoint holds no state_dict (looked for a bare one and under "
                         + "/".join(_WRAPPER_KEYS) + ")")
    out = {}
    for k, v in sd.items():
        while k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    return out


def _rename_classifier(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Map a CIFAR-ResNet classifier named ``linear`` onto ``fc`` or back, whichever the model uses."""
    for src, dst in (("linear.", "fc."), ("fc.", "linear.")):
        if any(k.startswith(src) for k in sd) and not any(k.startswith(src) for k in model_keys) \
                and any(k.startswith(dst) for k in model_keys):
            return {(dst + k[len(src):] if k.startswith(src) else k): v for k, v in sd.items()}
    return sd


def load_checkpoint(model: nn.Module, path_or_state: str | os.PathLike | dict) -> dict[str, Any]:
    """Load weights into ``model`` strictly; return the checkpoint's other top-level entries.

    Accepts a path or an already loaded object: a bare state_dict or one under state_dict/model/net,
    ``module.`` prefixes (DataParallel), and ``linear``/``fc`` classifier names. Files are read with
    ``weights_only=True``: loading never runs code from the file.
    """
    obj = path_or_state if isinstance(path_or_state, dict) else load_torch_file(path_or_state, "checkpoint")
    sd = extract_state_dict(obj)
    own = model.state_dict()
    sd = _rename_classifier(sd, set(own))
    for k in own:  # checkpoints from before torch 0.4.1 have no BN batch counters
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros_like(own[k])
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label} {len(items)}: {', '.join(items[:5])}{more}")
        arch = getattr(model, "hrank_arch", type(model).__name__)
        raise HRankError(f"checkpoint does not fit {arch}: " + "; ".join(parts))
    model.load_state_dict(sd, strict=True)
    extra = {}
    if isinstance(obj, dict):
        extra = {k: v for k, v in obj.items() if k not in _WRAPPER_KEYS and not isinstance(v, torch.Tensor)}
    return extra
