"""Models from outside the registry, named by a reference string: ``torchvision:NAME``, ``timm:NAME``,
``package.module:factory`` or ``path/to/file.py:factory``.

The reference is what a saved file records (as ``arch``), so it must rebuild the same unpruned network on
load: weights are never downloaded (``weights=None`` / ``pretrained=False``); they come from checkpoint files.
Every failure is one :class:`HRankError` line that names the reference.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from hrank.errors import HRankError
from hrank.layers import conv_names
from hrank.models.base import ArchSpec, RankPoint

__all__ = ["is_external", "build", "spec", "Factory", "resolve"]

_DEFAULTS = {"dataset": "imagenet", "input_size": (3, 224, 224), "num_classes": 1000, "normalization": "imagenet"}


def is_external(ref: str) -> bool:
    """True for references of the ``SOURCE:NAME`` forms (registry names never contain a colon)."""
    return isinstance(ref, str) and ":" in ref


def runs_code(ref: str) -> bool:
    """True for references that import user code to build the model (``module:factory``, ``path.py:factory``);
    torchvision and timm names only pick a model inside an installed library."""
    if not is_external(ref):
        return False
    source = ref.rpartition(":")[0]
    return source not in ("torchvision", "timm")


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


@dataclass(frozen=True)
class Factory:
    """A resolved reference: ``call(num_classes)`` builds the model; ``accepts_num_classes`` says whether
    ``num_classes`` reaches the model; ``defaults`` overrides the spec defaults (input_size, num_classes, ...)."""

    ref: str
    call: Callable[[int | None], Any]
    accepts_num_classes: bool
    defaults: Mapping[str, Any]
    description: str


def _split(ref: str) -> tuple[str, str]:
    source, sep, name = ref.rpartition(":")
    if not sep or not source or not name:
        raise HRankError(f"model {ref!r}: expected torchvision:NAME, timm:NAME or package.module:factory")
    return source, name


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


def _torchvision(ref: str, name: str) -> Factory:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise HRankError(f"model {ref!r} needs torchvision: pip install 'hrank[vision]'") from None
    except Exception as e:  # a torchvision built for another torch fails with RuntimeError
        raise HRankError(f"model {ref!r}: torchvision does not import ({_short(e)})") from None
    known = list(tvm.list_models())
    if name not in known:
        raise HRankError(f"model {ref!r}: torchvision has no model {name!r} (torchvision.models.list_models() "
                         f"lists them){_suggest(name, known)}")

    def call(num_classes: int | None) -> Any:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return tvm.get_model(name, weights=None, **kwargs)

    return Factory(ref, call, True, {}, f"torchvision {name} (weights from --checkpoint)")


def _timm(ref: str, name: str) -> Factory:
    try:
        import timm
    except ImportError:
        raise HRankError(f"model {ref!r} needs timm: pip install timm") from None
    except Exception as e:
        raise HRankError(f"model {ref!r}: timm does not import ({_short(e)})") from None
    if not timm.is_model(name):
        raise HRankError(f"model {ref!r}: timm has no model {name!r} (timm.list_models() lists them)"
                         f"{_suggest(name, list(timm.list_models()))}")
    defaults: dict[str, Any] = {}
    try:  # input size and classes of the model's default config; informational, so any failure is ignored
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
        if cfg is not None and cfg.input_size and len(cfg.input_size) == 3:
            defaults["input_size"] = tuple(int(v) for v in cfg.input_size)
        if cfg is not None and isinstance(cfg.num_classes, int) and cfg.num_classes > 0:
            defaults["num_classes"] = cfg.num_classes
    except Exception:
        pass

    def call(num_classes: int | None) -> Any:
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return timm.create_model(name, pretrained=False, **kwargs)

    return Factory(ref, call, True, defaults, f"timm {name} (weights from --checkpoint)")


def _is_path(source: str) -> bool:
    return source.endswith(".py") or "/" in source or os.sep in source


def _import_file(ref: str, source: str) -> Any:
    path = Path(source).expanduser()
    if not path.is_file():
        raise HRankError(f"model {ref!r}: no file {source}")
    resolved = str(path.resolve())
    name = f"_hrank_external_{path.stem}_{hashlib.sha1(resolved.encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise HRankError(f"model {ref!r}: cannot import {source} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as e:
        del sys.modules[name]
        raise HRankError(f"model {ref!r}: importing {source} failed ({_short(e)})") from None
    return module


def _import_module(ref: str, source: str) -> Any:
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as e:
        # Console scripts do not put the working directory on sys.path (``python -m`` does): look there too.
        cwd = os.getcwd()
        top = source.split(".")[0]
        if e.name == top and cwd not in sys.path and "" not in sys.path and (
                Path(cwd, top).is_dir() or Path(cwd, top + ".py").is_file()):
            sys.path.append(cwd)
            try:
                return importlib.import_module(source)
            except Exception as e2:
                sys.path.remove(cwd)
                raise HRankError(f"model {ref!r}: cannot import module {source!r} ({_short(e2)})") from None
        raise HRankError(f"model {ref!r}: cannot import module {source!r} ({_short(e)})") from None
    except Exception as e:
        raise HRankError(f"model {ref!r}: cannot import module {source!r} ({_short(e)})") from None


def _accepts_num_classes(fn: Callable) -> tuple[bool, int | None]:
    """(whether ``fn`` takes ``num_classes=``, its default when that is an int)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # builtins and some C extensions have no signature
        return False, None
    p = params.get("num_classes")
    if p is not None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
        default = p.default if isinstance(p.default, int) and not isinstance(p.default, bool) else None
        return True, default
    return any(q.kind == q.VAR_KEYWORD for q in params.values()), None


def _factory(ref: str, source: str, attr: str) -> Factory:
    module = _import_file(ref, source) if _is_path(source) else _import_module(ref, source)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise HRankError(f"model {ref!r}: {source} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise HRankError(f"model {ref!r}: {attr} is a {type(obj).__name__}, not a callable that builds a model")
    accepts, default = _accepts_num_classes(obj)
    defaults: dict[str, Any] = {}
    if default is not None:
        defaults["num_classes"] = default
    declared = getattr(obj, "hrank_defaults", None)  # optional: input_size, num_classes, normalization, dataset
    if isinstance(declared, Mapping):
        defaults.update({k: v for k, v in declared.items() if k in _DEFAULTS})
        if "input_size" in defaults:
            defaults["input_size"] = tuple(int(v) for v in defaults["input_size"])
    factory = obj

    def call(num_classes: int | None) -> Any:
        return factory(num_classes=num_classes) if accepts and num_classes is not None else factory()

    doc = (inspect.getdoc(obj) or "").strip().splitlines()
    return Factory(ref, call, accepts, defaults, doc[0] if doc else f"{source}:{attr}")


def resolve(ref: str) -> Factory:
    """Find what ``ref`` names (importing its module) without building it; a one-line error otherwise."""
    source, name = _split(ref)
    if source == "torchvision":
        return _torchvision(ref, name)
    if source == "timm":
        return _timm(ref, name)
    return _factory(ref, source, name)


def build(ref: str, num_classes: int | None = None) -> nn.Module:
    """Build the model ``ref`` names with fresh weights; ``num_classes`` is passed only where the factory
    takes it (None: the factory's own default)."""
    factory = resolve(ref)
    try:
        model = factory.call(num_classes)
    except HRankError:
        raise
    except (Exception, SystemExit) as e:  # a factory that calls sys.exit() is a failed build, not an exit
        raise HRankError(f"model {ref!r}: building it failed ({_short(e)})") from None
    if not isinstance(model, nn.Module):
        raise HRankError(f"model {ref!r}: the factory returned {type(model).__name__}, not an nn.Module")
    return model


def _every_conv(model: nn.Module) -> list[tuple[str, ...]]:
    return [(name,) for name in conv_names(model)]


def _no_points(model: nn.Module) -> dict[str, RankPoint]:
    return {}  # hrank.ranks discovers the rank point of every conv itself


def spec(ref: str) -> ArchSpec:
    """An :class:`ArchSpec` for ``ref``: ImageNet defaults (3x224x224 input, 1000 classes, "imagenet"
    normalization) unless the source says otherwise, every conv its own rate entry, no hand-written rank points.

    A ``module:factory`` refines the defaults through its ``num_classes`` default and an optional
    ``factory.hrank_defaults`` mapping (``input_size``, ``num_classes``, ``normalization``, ``dataset``).
    """
    factory = resolve(ref)
    d = {**_DEFAULTS, **factory.defaults}
    return ArchSpec(ref, partial(build, ref), str(d["dataset"]), tuple(d["input_size"]),  # type: ignore[arg-type]
                    int(d["num_classes"]), str(d["normalization"]), _every_conv, _no_points,
                    description=factory.description)
