"""The pipeline's steps, each implemented once: data -> model -> scores -> spec -> plan + prune -> fine-tune ->
evaluate -> export. ``hrank run`` composes them with stage caching; ``hrank rank/prune/finetune/eval`` are thin
wrappers over the same functions, so a step cannot behave differently depending on which command ran it.

Every function takes typed inputs and returns a value (no argparse namespaces, no printing unless a
``printer`` is given); errors are one-line :class:`hrank.errors.HRankError`\\ s.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hrank import criteria, datasets, flops, models
from hrank.data import Normalization, Split
from hrank.datasets import DataOptions, DataSplits
from hrank.distributed import DistInfo
from hrank.errors import HRankError
from hrank.plan import Plan
from hrank.ranks import Ranks
from hrank.recipes import Recipe
from hrank.spec import Spec
from hrank.validate import check_finite

Printer = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# -- data -----------------------------------------------------------------------------------------------------

def load_data(dataset: str, opts: DataOptions) -> DataSplits:
    """The dataset's splits (``hrank.datasets.load``): validation carved from train, subsets seeded."""
    return datasets.load(dataset, opts)


# -- model ----------------------------------------------------------------------------------------------------

@dataclass
class LoadedModel:
    """A model ready for the next step, with what the steps after it need to know about it."""

    model: nn.Module
    ref: str | None  # the model reference (registry name, torchvision:NAME, timm:NAME, module:factory)
    normalization: Normalization
    source: str  # where the weights came from, for reports
    plan: Plan | None = None  # set when the model file was pruned
    mode: str | None = None  # physical / mask, for pruned model files
    info: dict[str, Any] = field(default_factory=dict)


def default_normalization(ref: str | None, dataset: str | None = None) -> str:
    """The normalization a model is used with when nothing else says: the architecture's, else the dataset's."""
    if ref is not None:
        return models.get_spec(ref).normalization
    return datasets.get(dataset).normalization if dataset else "cifar"


def load_model(ref: str | None = None, *, checkpoint: str | os.PathLike | None = None,
               model_file: str | os.PathLike | None = None, num_classes: int | None = None,
               normalization: str | Normalization | dict | None = None,
               dataset: str | None = None) -> LoadedModel:
    """A model from a reference + optional weights (``checkpoint``), or from a file hrank wrote (``model_file``).

    Normalization: ``normalization`` if given, else what the file carries, else the architecture's preset,
    else the dataset's. Non-finite weights are refused.
    """
    from hrank.checkpoint import load_weights
    from hrank.train import load_model_file

    if model_file is not None:
        if checkpoint is not None:
            raise HRankError("give either a model file or a model with a checkpoint, not both")
        if ref is not None:  # the user names the code that built the file (a file never chooses code to run)
            models.trust(ref)
        model, info = load_model_file(model_file, arch=ref)  # a file of another model: refused before building
        check_finite(model, f"model file {model_file}")
        arch = info.get("arch") or getattr(model, "hrank_arch", None)
        norm = normalization or info.get("normalization") or default_normalization(arch, dataset)
        return LoadedModel(model, arch, Normalization.get(norm), f"model file {model_file}", info.get("plan"),
                           info.get("mode"), info)
    if ref is None:
        raise HRankError("no model: give a model (registry name, torchvision:NAME, timm:NAME or module:factory) "
                         "or a model file")
    model = models.create(ref, num_classes=num_classes)
    extra: dict[str, Any] = {}
    source = "initialised"
    if checkpoint is not None:
        extra = load_weights(model, checkpoint)
        check_finite(model, f"checkpoint {checkpoint}")
        source = f"checkpoint {checkpoint}"
    norm = normalization or extra.get("normalization") or default_normalization(ref, dataset)
    return LoadedModel(model, ref, Normalization.get(norm), source, info=extra)


def check_classes(model: nn.Module, num_classes: int, what: str) -> None:
    """The model's last Linear layer must have as many outputs as the data has classes."""
    out = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if out and out[-1].out_features != num_classes:
        raise HRankError(f"the model has {out[-1].out_features} outputs but {what} has {num_classes} classes")


# -- scores ---------------------------------------------------------------------------------------------------

def load_scores(path: str | os.PathLike, model: nn.Module, arch: str | None = None) -> Ranks:
    """A ranks file from ``hrank rank`` (.npz), or an official HRank ``rank_conv/<arch>`` folder, checked
    against ``model``."""
    p = Path(path)
    if p.is_dir():
        arch = arch or getattr(model, "hrank_arch", None)
        if arch is None:
            raise HRankError(f"{p} is an official rank folder; those exist only for the registry architectures")
        ranks = Ranks.from_official(p, arch)
        ranks.validate(model)
        return ranks
    return Ranks.load(p, model=model)


def score_filters(model: nn.Module, criterion: str = "hrank", *, data: Split | None = None, num_images: int = 500,
                  batch_size: int = 128, augment: bool = True, seed: int = 0,
                  normalization: Normalization | str | dict | None = None, device: torch.device | None = None,
                  progress: bool = True, method: str = "gram", convs: Sequence[str] | None = None) -> Ranks:
    """Every filter's score by ``criterion`` (``hrank.criteria``); HRank's ranks are computed on ``data``'s
    images (all-reduced over the processes under torchrun, so every process gets the one result)."""
    inputs = criteria.ScoreInputs(convs=convs, seed=seed, data=data, num_images=num_images, batch_size=batch_size,
                                  augment=augment, normalization=normalization, device=device, progress=progress,
                                  method=method)
    return criteria.score(criterion, model, inputs)


# -- spec -----------------------------------------------------------------------------------------------------

@dataclass
class RateOptions:
    """How much to prune: rates (string, patterns, file) or a MACs/params target, and what to leave alone."""

    compress_rate: str | None = None  # HRank's list syntax
    rates: Mapping[str, float] | str | None = None  # {pattern: rate} or "pat=0.5,pat2=0.3"
    rates_file: str | os.PathLike | None = None  # YAML/JSON of patterns or compress_rate
    ignore: Sequence[str] | str | None = None  # glob patterns of convs to leave alone
    target_macs: float | int | str | None = None
    target_params: float | int | str | None = None
    target_latency: float | None = None  # fraction of the dense model's latency measured with ``latency``
    latency: Any = None  # hrank.latency.LatencySetup (default: torch, batch 1, channels_last)
    latency_cache: str | os.PathLike | None = None  # folder of the per-layer latency tables
    max_rate: float = 0.9
    budget_order: str = "coupled"
    round_to: int = 8

    @property
    def target(self) -> tuple[str, Any] | None:
        given = [(k, v) for k, v in (("macs", self.target_macs), ("params", self.target_params),
                                     ("latency", self.target_latency)) if v is not None]
        if len(given) > 1:
            raise HRankError("give one target: MACs, params or latency")
        return given[0] if given else None

    def ignore_list(self) -> list[str]:
        if not self.ignore:
            return []
        if isinstance(self.ignore, str):
            return [p.strip() for p in self.ignore.split(",") if p.strip()]
        return list(self.ignore)


@dataclass
class SpecResult:
    """Per-conv rates, and the budget search that found them (when a target was given)."""

    spec: Spec
    budget: Any = None  # hrank.budget.BudgetResult

    def to_json(self) -> dict[str, Any]:
        """What ``spec.json`` holds: the rates, their HRank string when one exists, the budget search."""
        try:
            text = self.spec.to_hrank_string()
        except HRankError:
            text = None
        out: dict[str, Any] = {"compress_rate": text, "spec": self.spec.to_json()}
        if self.budget is not None:
            out["budget"] = self.budget.to_json()
        return out


def rates_spec(model: nn.Module, rates: RateOptions) -> Spec:
    """The spec written by the rates themselves (no target): string, then file, then patterns; minus ignore."""
    from hrank.spec import parse_mapping_string

    spec = Spec.from_string(model, rates.compress_rate) if rates.compress_rate else None
    if rates.rates_file:
        spec = Spec.from_file(model, rates.rates_file, base=spec)
    if rates.rates:
        mapping = parse_mapping_string(rates.rates) if isinstance(rates.rates, str) else rates.rates
        spec = Spec.from_mapping(model, mapping, base=spec)
    if spec is None:
        raise HRankError("no rates: give a compress rate, rates by pattern, a rates file, or a MACs/params target")
    ignore = rates.ignore_list()
    return spec.without(model, ignore) if ignore else spec


def build_spec(model: nn.Module, rates: RateOptions, scores: Ranks | Mapping[str, Any] | None = None, *,
               progress: Printer | None = None) -> SpecResult:
    """Per-conv rates from ``rates``; a MACs/params target is met by a search on the real pruned network
    (``hrank.budget.find_budget``), which needs ``scores``."""
    target = rates.target
    if target is None:
        return SpecResult(rates_spec(model, rates))
    if rates.compress_rate or rates.rates or rates.rates_file:
        raise HRankError("a MACs/params target replaces the rates; give one of them")
    if scores is None:
        raise HRankError("a MACs/params target needs filter scores")
    from hrank.budget import find_budget

    metric, value = target
    if metric == "latency":
        from hrank.latency import find_latency_budget

        result = find_latency_budget(model, scores, target=value, setup=rates.latency, max_rate=rates.max_rate,
                                     order=rates.budget_order, ignore=rates.ignore_list() or None,
                                     cache_dir=rates.latency_cache, progress=progress)
        return SpecResult(result.spec, result)
    result = find_budget(model, scores, target=value, metric=metric, max_rate=rates.max_rate,
                         order=rates.budget_order, round_to=rates.round_to, progress=progress,
                         ignore=rates.ignore_list() or None)
    return SpecResult(result.spec, result)


def check_rates(model: nn.Module, rates: RateOptions, *, out: str | os.PathLike | None = None) -> None:
    """Check the rates before any work: the string/patterns parse against ``model``; a target is reachable
    (searched on L1 scores, which cost nothing, so an impossible target fails before ranks are computed).
    A latency target's setup is checked, and its cache folder: writable, and not inside ``out`` (the command's
    output directory)."""
    from hrank.budget import parse_target

    target = rates.target
    if target is None:
        rates_spec(model, rates)
        return
    if target[0] == "latency":  # measuring is the search itself: check the options only
        from hrank.latency import LatencySetup, check_cache_dir, check_target

        check_target(target[1])
        (rates.latency or LatencySetup()).check()
        if rates.latency_cache is not None:
            check_cache_dir(rates.latency_cache, out=out)
        return
    parse_target(target[1])
    build_spec(model, rates, criteria.l1_scores(model))


# -- plan + prune ---------------------------------------------------------------------------------------------

def make_plan(model: nn.Module, scores: Ranks | Mapping[str, Any], spec: Spec, *, criterion: str = "hrank",
              coupling: str = "groups", width_rule: str = "mean") -> Plan:
    """Kept channels per coupled group (``hrank.plan.make_plan``)."""
    from hrank.plan import make_plan as _make_plan

    return _make_plan(model, scores, spec, criterion=criterion, coupling=coupling, width_rule=width_rule)


@dataclass
class PruneResult:
    """The pruned model and what pruning did to it."""

    model: nn.Module
    before: flops.Counts
    after: flops.Counts
    hrank_rule: dict[str, Any]  # HRank's own counting rule: {"as_pruned": Counts, ...} (empty without a spec)
    metrics: dict[str, Any]  # {"after_prune": {...}, "after_recalibration": {...}} when data was given
    recalibrated_on: int | None = None


def recalibration_batches(split: Split, *, images: int, normalization: Normalization | str | dict,
                          device: torch.device, seed: int = 0, batch_size: int = 128) -> Any:
    """Augmented training batches for BN recalibration (seeded: the same images every time)."""
    return split.train_batches(max(2, min(batch_size, images, len(split))), normalization=normalization,
                               device=device, seed=seed)


def prune_model(model: nn.Module, plan: Plan, *, mode: str = "physical", spec: Spec | None = None,
                calibration: Split | None = None, calibration_images: int = 512, eval_split: Split | None = None,
                eval_images: int | None = None, normalization: Normalization | str | dict = "cifar",
                device: torch.device | None = None, seed: int = 0, batch_size: int = 128) -> PruneResult:
    """Apply ``plan`` (physically, or as HRank's masks), checked against its invariant by ``apply_plan``;
    re-estimate BN statistics on ``calibration`` images; evaluate on (the first ``eval_images`` of)
    ``eval_split`` before pruning, after it and after recalibration."""
    from hrank.prune import apply_plan, hrank_rule_counts, recalibrate_bn

    device = device or torch.device("cpu")
    input_size = tuple(plan.input_size)
    before = flops.count(model, input_size)
    rule = hrank_rule_counts(model, spec, input_size) if spec is not None else {}
    metrics: dict[str, Any] = {}
    model = model.to(device)
    if eval_split is not None:
        metrics["dense"] = evaluate_split(model, eval_split, normalization=normalization, device=device,
                                           limit=eval_images)
    model = apply_plan(model, plan, mode=mode)
    after = flops.count(model, input_size)
    used = None
    if eval_split is not None:
        metrics["after_prune"] = evaluate_split(model, eval_split, normalization=normalization, device=device,
                                           limit=eval_images)
    if calibration is not None:
        batches = recalibration_batches(calibration, images=calibration_images, normalization=normalization,
                                        device=device, seed=seed, batch_size=batch_size)
        used = recalibrate_bn(model.to(device), batches, calibration_images)
        if eval_split is not None:
            metrics["after_recalibration"] = evaluate_split(model, eval_split, normalization=normalization,
                                                            device=device, limit=eval_images)
    return PruneResult(model.cpu().eval(), before, after, rule, metrics, used)


# -- evaluate -------------------------------------------------------------------------------------------------

def evaluate_split(model: nn.Module, split: Split, *, normalization: Normalization | str | dict,
                   device: torch.device | None = None, batch_size: int = 500, limit: int | None = None,
                   dist: DistInfo | None = None) -> dict[str, Any]:
    """Top-1/top-5/loss/per-class of ``model`` on ``split`` (its first ``limit`` images); under torchrun each
    process takes a disjoint slice and the counts are summed, so every process returns the whole result."""
    from hrank.train import evaluate

    dist = dist or DistInfo.current()
    if limit is not None and limit < len(split):
        split = split.subset(np.arange(limit), f"{getattr(split, 'name', '')}[:{limit}]")
    device = device or next((p.device for p in model.parameters()), torch.device("cpu"))
    batches = split.eval_batches(batch_size, normalization=normalization, device=device)
    if dist.enabled:
        batches = batches.shard(dist.rank, dist.world_size)
    return evaluate(model.to(device), batches, all_reduce=dist.enabled)


def evaluate_splits(model: nn.Module, splits: Mapping[str, Split | None], *,
                    normalization: Normalization | str | dict, device: torch.device | None = None,
                    batch_size: int = 500) -> dict[str, float]:
    """``{name}_top1`` and ``{name}_top5`` for every split given (None splits are skipped)."""
    out: dict[str, float] = {}
    for name, split in splits.items():
        if split is not None:
            m = evaluate_split(model, split, normalization=normalization, device=device, batch_size=batch_size)
            out[f"{name}_top1"], out[f"{name}_top5"] = m["top1"], m["top5"]
    return out


# -- fine-tune ------------------------------------------------------------------------------------------------

def finetune(model: nn.Module, data: DataSplits, recipe: Recipe, *, normalization: Normalization | str | dict,
             device: torch.device, out_dir: str | os.PathLike, seed: int = 0, plan: Plan | None = None,
             mode: str = "physical", resume: bool = False, overwrite: bool = False, select_on_test: bool = False,
             run_info: dict[str, Any] | None = None, stop_after: int | None = None, progress: bool = True,
             teacher: nn.Module | None = None, printer: Printer = print) -> Any:
    """Train ``model`` on ``data.finetune`` with ``recipe`` (DDP under torchrun), selecting the best epoch on
    ``data.val`` (or the test split with ``select_on_test``). One-shot, or layer by layer when the recipe is
    layer-wise: then ``model`` is the unpruned model and ``plan`` is applied step by step. ``teacher`` (the
    unpruned model) is distilled into ``model`` when the recipe says so (``distill_weight``)."""
    from hrank.train import fit, make_eval_batches, make_train_batches

    norm = Normalization.get(normalization)
    check_classes(model, data.num_classes, data.test.name or "the dataset")
    model = model.to(device)
    train = make_train_batches(data.finetune, recipe, normalization=norm, device=device, seed=seed)
    val = make_eval_batches(data.val, normalization=norm, device=device) if data.val is not None else None
    test = make_eval_batches(data.test, normalization=norm, device=device)
    if val is None and not select_on_test:  # never select on the test set unasked
        raise HRankError("no validation split to select the best epoch on: give one (e.g. --val-size 5000) or "
                         "pass --select-on-test to select on the test set")
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(out_dir=out_dir, resume=resume, overwrite=overwrite, test_batches=test,
                                  select_on_test=select_on_test, run_info=run_info, stop_after_epoch=stop_after,
                                  progress=progress, printer=printer, teacher=teacher)
    if recipe.layerwise:
        if plan is None:
            raise HRankError("layer-wise fine-tuning prunes step by step and needs the unpruned model and a plan "
                             "(or use a one-shot recipe, e.g. --no-layerwise)")
        from hrank.layerwise import fit_layerwise

        _, result = fit_layerwise(model, plan, train, val, recipe, mode=mode, **kwargs)
        return result
    return fit(model, train, val, recipe, **kwargs)


# -- export ---------------------------------------------------------------------------------------------------

def export_model(model: nn.Module, formats: Sequence[str], out_dir: str | os.PathLike,
                 input_size: tuple[int, ...], *, printer: Printer = _quiet) -> dict[str, Any]:
    """Write ``model`` in every format (``hrank.export`` registry), each checked against PyTorch."""
    from hrank import export

    info: dict[str, Any] = {}
    for fmt in formats:
        exporter = export.get(fmt)
        check = exporter.export(model, Path(out_dir) / exporter.filename, input_size)
        info[fmt] = {"path": Path(check.path).name, "max_abs_diff": check.max_abs_diff, "ok": check.ok,
                     "batchnorm_left": check.batchnorm_left}
        bn = "" if check.batchnorm_left is None else f", {check.batchnorm_left} BatchNorm left unfolded"
        printer(f"exported {fmt}: {Path(check.path).name} (max |diff| vs PyTorch {check.max_abs_diff:.1e}{bn})")
        if check.note:
            printer(f"  note: {check.note}")
    return info


def input_size_of(ref: str | None, data: DataSplits | None = None) -> tuple[int, int, int]:
    """The (C, H, W) a model sees: the data's when known, else the architecture's."""
    if data is not None:
        return tuple(data.input_size)  # type: ignore[return-value]
    return tuple(models.get_spec(ref).input_size) if ref else (3, 32, 32)  # type: ignore[return-value]
