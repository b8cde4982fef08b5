"""Save and load (pruned) models without pickling modules: weights + plan + metadata.

A file written by :func:`save` is a ``torch.save`` of a plain dict: ``format``, ``hrank_record`` (a JSON
string: architecture, num_classes, normalization, mode, the plan, user extras, hrank version) and
``state_dict``. :func:`load` reads it with ``weights_only=True`` (loading never runs code from the file),
rebuilds the unpruned model from its recorded reference (a registry name, ``torchvision:NAME``, ``timm:NAME`` or
``module:factory``; see :func:`hrank.models.create`) or a user ``builder``, replays the plan and loads the
weights strictly, so the round trip gives bit-identical outputs. Training checkpoints embed :func:`model_record`
(metadata; ``weights=True`` adds the state_dict) and rebuild with :func:`build_from_record`.

The record also keeps the state_dict's per-module metadata (``state_dict()._metadata``: prefix ->
``{"version": n}``) as ``state_metadata``, and loading hands it back to ``load_state_dict``: modules whose
``_load_from_state_dict`` checks its version (torchvision's MNASNet, BatchNorm's counters) see the version they
were saved with. Files written before it existed load as before (without versions).
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrank import __version__, models
from hrank.data import Normalization
from hrank.errors import HRankError
from hrank.io import atomic_torch_save, describe_json, is_json_int, load_torch_file

__all__ = ["save", "load", "model_record", "build_from_record", "read_record", "load_state", "state_metadata", "FORMAT"]

FORMAT = "hrank.model"
VERSION = 1


def _unwrap(model: nn.Module) -> nn.Module:
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or (
            hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module)):
        model = model.module if hasattr(model, "module") else model._orig_mod
    return model


def _num_classes(model: nn.Module) -> int | None:
    """The last Linear's width (today's rule, robust to a replaced head), else what ``models.create`` was
    given (models whose classifier is a conv, such as SqueezeNet)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if linears:
        return linears[-1].out_features
    n = getattr(model, "hrank_num_classes", None)
    return n if isinstance(n, int) else None


_PLAIN = (bool, int, float, str, type(None))


def state_metadata(state: Mapping[str, Any] | nn.Module) -> dict[str, dict[str, Any]]:
    """The JSON-able part of a state_dict's per-module metadata: prefix -> ``{"version": n, ...}``.

    ``state`` is a module or a state_dict (an ``OrderedDict`` carrying ``_metadata``; a plain dict has none,
    giving ``{}``). Only plain scalar values are kept: they are what ``_load_from_state_dict`` implementations
    read, and the record must stay JSON.
    """
    if isinstance(state, nn.Module):
        state = state.state_dict()
    meta = getattr(state, "_metadata", None) or {}
    return {str(prefix): {str(k): v for k, v in entry.items() if isinstance(v, _PLAIN)}
            for prefix, entry in meta.items() if isinstance(entry, Mapping)}


def _with_metadata(state: Mapping[str, torch.Tensor], metadata: Mapping[str, Mapping[str, Any]]
                   ) -> OrderedDict[str, torch.Tensor]:
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(state)
    sd._metadata = OrderedDict((p, dict(e)) for p, e in metadata.items())  # type: ignore[attr-defined]
    return sd


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor],
               metadata: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Load ``state`` into ``model`` strictly, with module versions from ``metadata``.

    ``metadata`` defaults to the ``_metadata`` the state_dict carries (an ``OrderedDict`` from
    ``model.state_dict()`` or ``torch.load`` keeps it). When keys and shapes match the model exactly the state is
    loaded with that metadata; otherwise (or without any metadata: files from older hrank)
    :func:`hrank.models.load_checkpoint` loads it, which maps classifier names and raises a one-line
    :class:`HRankError` naming missing, unexpected and mismatched entries.
    """
    if metadata is None:
        metadata = state_metadata(state) or None
    own = model.state_dict()
    exact = set(state) == set(own) and all(
        isinstance(state[k], torch.Tensor) and state[k].shape == own[k].shape for k in own)
    if metadata is None or not exact:
        models.load_checkpoint(model, dict(state))
        return
    model.load_state_dict(_with_metadata(state, metadata), strict=True)


def model_record(model: nn.Module, *, plan: Any = None, arch: str | None = None, num_classes: int | None = None,
                 normalization: Normalization | str | dict | None = None, extra: Mapping | None = None,
                 weights: bool = False) -> dict:
    """What rebuilds ``model``: plain, JSON-serialisable metadata (arch, num_classes, normalization, mode,
    plan, extra); with ``weights`` also a CPU copy of its state_dict under ``"state_dict"``. No modules, no
    code; ``torch.load(weights_only=True)`` reads a checkpoint embedding it.

    Defaults come from the model: ``model.hrank_plan``, ``model.hrank_mode``, ``model.hrank_arch`` (the reference
    :func:`hrank.models.create` built it from) and the width of its last Linear layer (else
    ``model.hrank_num_classes``). ``extra`` must be JSON-serialisable (it is stored as JSON). The module
    versions of the state_dict (:func:`state_metadata`) are recorded as ``state_metadata``, so that weights
    stored next to the record load the way they were saved.
    """
    model = _unwrap(model)
    plan = plan if plan is not None else getattr(model, "hrank_plan", None)
    mode = (getattr(model, "hrank_mode", None) or "physical") if plan is not None else None
    arch = arch or getattr(model, "hrank_arch", None)
    norm = Normalization.get(normalization).to_json() if normalization is not None else None
    record = {
        "format": FORMAT, "version": VERSION, "hrank_version": __version__,
        "arch": arch, "num_classes": num_classes if num_classes is not None else _num_classes(model),
        "normalization": norm, "mode": mode,
        "plan": plan.to_json() if plan is not None else None,
        "extra": dict(extra) if extra is not None else {},
        "state_metadata": state_metadata(model),
    }
    try:
        json.dumps(record)
    except (TypeError, ValueError) as e:
        raise HRankError(f"model metadata is not JSON-serialisable ({e}); pass plain values in extra") from None
    if weights:
        record["state_dict"] = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return record


def _check_record(record: Any, where: str = "") -> None:
    """One-line errors for a record (``where``: its file, if known) that is newer than this hrank or damaged: the
    fields hrank reads must have their types, so that nothing fails later with a traceback or is read wrongly."""
    at = f"{where}: " if where else ""
    bad = f"{at}damaged model record:"
    if not isinstance(record, Mapping):
        raise HRankError(f"{bad} it is {describe_json(record)}, not an object")
    version = record.get("version", 0)
    if not is_json_int(version):
        raise HRankError(f"{bad} version must be an integer, got {describe_json(version)}")
    if version > VERSION:
        raise HRankError(f"{at}model record version {version} is newer than this hrank supports")
    norm = record.get("normalization")
    if isinstance(norm, Mapping):
        try:
            Normalization.get(dict(norm))
        except HRankError as e:
            raise HRankError(f"{bad} {e}") from None
        if not isinstance(norm.get("name", "custom"), str):
            raise HRankError(f"{bad} the normalization's name must be a string, got {describe_json(norm.get('name'))}")
    elif norm is not None and not isinstance(norm, str):
        raise HRankError(f"{bad} normalization must be an object, a preset name or null, got {describe_json(norm)}")
    meta = record.get("state_metadata")
    if meta is not None:
        if not isinstance(meta, Mapping):
            raise HRankError(f"{bad} state_metadata must be an object, got {describe_json(meta)}")
        for prefix, entry in meta.items():
            if not isinstance(prefix, str) or not isinstance(entry, Mapping) or not all(
                    isinstance(k, str) and isinstance(v, _PLAIN) for k, v in entry.items()):
                raise HRankError(f"{bad} state_metadata[{describe_json(prefix)}] must be an object of plain values, "
                                 f"got {describe_json(entry)}")
    plan = record.get("plan")
    if plan is not None and not isinstance(plan, Mapping):
        raise HRankError(f"{bad} plan must be an object or null, got {describe_json(plan)}")
    from hrank.prune import MODES

    mode = record.get("mode")
    if mode is not None and mode not in MODES:  # read only with a plan, but a record that says it is damaged
        raise HRankError(f"{bad} mode must be {' or '.join(MODES)} (or null), got {describe_json(mode)}")


def build_from_record(record: Mapping[str, Any], builder: Callable[[], nn.Module] | None = None, *,
                      arch: str | None = None, source: str = "the file") -> nn.Module:
    """Rebuild the (pruned) model a record describes; load its weights strictly when it holds them.

    The unpruned model comes from ``builder()`` when given (a zero-argument callable, e.g.
    ``functools.partial(MyNet, num_classes=10)``), else from the recorded reference ``record["arch"]`` (a registry
    name, ``torchvision:NAME``, ``timm:NAME`` or ``module:factory``, rebuilt by :func:`hrank.models.create`
    with the recorded num_classes; a reference that no longer resolves is a one-line error); then the plan is
    replayed in the recorded mode and ``record["state_dict"]`` (if any) is loaded with the recorded module
    versions (``record["state_metadata"]``; records without it load as before). ``arch``: the reference the
    user expects (``--model`` beside ``--model-file``); a record of another one is refused before anything is
    built (``source`` names the file in that message).
    """
    from hrank.plan import Plan
    from hrank.prune import apply_plan, enforce_masks

    if not isinstance(record, Mapping) or record.get("format") != FORMAT:
        raise HRankError("not an hrank model record (missing format: hrank.model)")
    _check_record(record)
    if arch is not None and record.get("arch") and record["arch"] != arch:
        raise HRankError(f"{source} holds {record['arch']}, not {arch}")
    if builder is not None:
        model = builder()
        if not isinstance(model, nn.Module):
            raise HRankError(f"builder returned {type(model).__name__}, not an nn.Module")
        if record.get("arch") and getattr(model, "hrank_arch", record["arch"]) != record["arch"]:
            raise HRankError(f"the file holds {record['arch']}, the builder made {model.hrank_arch}")
    elif record.get("arch"):
        try:
            model = models.create(record["arch"], num_classes=record.get("num_classes"), from_file=True)
        except HRankError as e:
            why = str(e).removeprefix(f"model {record['arch']!r}: ")
            raise HRankError(f"cannot rebuild the saved model {record['arch']!r}: {why} (or pass builder=, a callable "
                             f"returning the unpruned model)") from None
    else:
        raise HRankError("this model is not from the hrank registry; pass builder= (a callable returning the "
                         "unpruned model)")
    if record.get("plan") is not None:
        apply_plan(model, Plan.from_json(record["plan"]), mode=record.get("mode") or "physical")
    if record.get("state_dict") is not None:
        load_state(model, record["state_dict"], record.get("state_metadata"))
        enforce_masks(model)
    return model


def save(model: nn.Module, path: str | os.PathLike, *, plan: Any = None, arch: str | None = None,
         num_classes: int | None = None, normalization: Normalization | str | dict | None = None,
         extra: Mapping | None = None) -> Path:
    """Write weights + plan + metadata to ``path`` atomically (a plain dict; no pickled modules)."""
    record = model_record(model, plan=plan, arch=arch, num_classes=num_classes, normalization=normalization,
                          extra=extra, weights=True)
    state = record.pop("state_dict")
    return atomic_torch_save({"format": FORMAT, "hrank_record": json.dumps(record), "state_dict": state}, path)


def read_record(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(record, state_dict) of a file written by :func:`save`, read with ``weights_only=True``."""
    obj = load_torch_file(path, "model file")
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or "hrank_record" not in obj:
        raise HRankError(f"{path} is not a model saved by hrank.save (use hrank.models.load_checkpoint for plain "
                         f"state_dicts)")
    try:
        record = json.loads(obj["hrank_record"])
    except (TypeError, ValueError):
        raise HRankError(f"{path}: corrupt metadata") from None
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise HRankError(f"{path}: no state_dict")
    _check_record(record, str(path))
    return record, state


def load_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load an *unpruned* model's weights from any checkpoint hrank reads; return what it says about them.

    This is how external models (``torchvision:NAME``, ``timm:NAME``, ``module:factory``) get trained weights:
    hrank never downloads them.

    Accepts a plain state_dict checkpoint (see :func:`hrank.models.load_checkpoint`), a file written by
    :func:`save`, or a training checkpoint (``last.pt``/``best.pt``). A pruned model is refused: pruning
    starts from the unpruned network. Returns ``{"normalization": dict or None}``.
    """
    obj = load_torch_file(path, "checkpoint")
    record: dict | None = None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:  # written by hrank.save
        try:
            record = json.loads(obj.get("hrank_record") or "{}")
        except (TypeError, ValueError):
            raise HRankError(f"{path}: corrupt metadata") from None
        obj = {"state_dict": obj.get("state_dict")}
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "record" in obj["model"]:
        record = obj["model"]["record"]  # a training checkpoint: {"record": ..., "state_dict": ...}
        obj = {"state_dict": obj["model"].get("state_dict")}
    if record is not None and record.get("plan") is not None:
        raise HRankError(f"{path} holds an already pruned model; start from the unpruned checkpoint")
    extra = models.load_checkpoint(model, obj)
    norm = extra.get("normalization")
    if norm is None and record is not None:
        norm = record.get("normalization")
    return {"normalization": norm if isinstance(norm, dict) else None}


def load(path: str | os.PathLike, *, builder: Callable[[], nn.Module] | None = None,
         arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by :func:`save` (its recorded reference or ``builder``), replay its plan, load
    weights strictly; with ``arch``, a file of another model is refused before anything is built.

    Returns ``(model, meta)``; the model is on the CPU in eval mode. ``meta`` holds arch, num_classes,
    normalization, plan (a :class:`hrank.plan.Plan` or None), mode, extra and hrank_version.
    """
    record, state = read_record(path)
    model = build_from_record({**record, "state_dict": state}, builder, arch=arch, source=str(path))
    model.eval()
    meta = {k: record.get(k) for k in ("arch", "num_classes", "normalization", "mode", "extra", "hrank_version")}
    meta["plan"] = getattr(model, "hrank_plan", None)
    return model, meta
