"""Layer-wise fine-tuning, HRank's procedure: prune one step, fine-tune, continue from that step's best model.

HRank (Lin et al. 2020, lmbxmu/HRank) masks one conv at a time and fine-tunes 15 epochs after each, starting
every step from the previous step's best checkpoint (ResNet-50: one bottleneck per step). Here a step is one
coupled group of the plan (a conv alone, or a residual stream's convs together, since one kept set cannot
be applied half-way) or, with ``unit="block"``, every group starting in one residual block. Groups the plan
leaves whole need no step, so ResNet-56 with the official string takes 30 steps (27 block convs and 3
streams), not 55.

Each step is a ``hrank.train.fit`` run in ``out_dir/step_NNN`` (exact resume inside a step);
``out_dir/layerwise.json`` records the finished steps, so an interrupted run resumes at the step where it
stopped. Mask and physical mode both work: ``hrank.prune.apply_plan`` only prunes unpruned models, so each
step writes the weights fine-tuned so far back into a full-size copy and applies the plan up to that step.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrank.data import Batches
from hrank.errors import HRankError
from hrank.io import atomic_write_json
from hrank.modelcopy import copy_model
from hrank.plan import Plan, PlanGroup
from hrank.prune import apply_plan
from hrank.recipes import Recipe
from hrank.train import (
    DistInfo,
    FitResult,
    _barrier,
    _fmt_time,
    _shard_eval,
    _unwrap,
    evaluate,
    fingerprint,
    fit,
    read_checkpoint,
    save_model,
)

__all__ = ["fit_layerwise", "layerwise_steps"]


def _block_of(conv: str) -> str:
    """``layer2.3.conv1`` -> ``layer2.3`` (a residual block); a conv outside blocks is its own unit."""
    parts = conv.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else conv


def layerwise_steps(plan: Plan, model: nn.Module, unit: str = "auto") -> list[list[PlanGroup]]:
    """Split a plan into ordered pruning steps: lists of the plan's pruned groups.

    ``conv``: one coupled group per step (a conv alone, or a residual stream's convs together — one kept
    set cannot be applied half-way). ``block``: every group whose first conv lies in the same residual
    block (HRank fine-tunes ResNet-50 once per bottleneck). ``auto``: block for resnet_50, else conv.
    Steps follow the module order of the group's first conv. Groups the plan leaves whole need no step.
    """
    if unit == "auto":
        unit = "block" if getattr(model, "hrank_arch", None) == "resnet_50" else "conv"
    if unit not in ("conv", "block"):
        raise HRankError(f"unknown layer-wise unit {unit!r}; choose auto, conv or block")
    position = {name: i for i, (name, _) in enumerate(model.named_modules())}
    groups = sorted(plan.pruned_groups(), key=lambda g: min(position.get(m, len(position)) for m in g.members))
    steps: list[list[PlanGroup]] = []
    keys: list[str] = []
    for g in groups:
        first = min(g.members, key=lambda m: position.get(m, len(position)))
        key = _block_of(first) if unit == "block" else first
        if keys and keys[-1] == key:
            steps[-1].append(g)
        else:
            steps.append([g])
            keys.append(key)
    return steps


def _partial_plan(plan: Plan, steps: list[list[PlanGroup]], upto: int) -> Plan:
    """The plan restricted to the groups of steps ``0..upto`` (inclusive)."""
    chosen = {id(g) for step in steps[: upto + 1] for g in step}
    return dataclasses.replace(plan, groups=[g for g in plan.groups if id(g) in chosen])


def _physical_index_maps(template: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """For every floating state entry of ``template`` pruned by ``plan``: each element's flat index in the
    unpruned tensor. Found by pruning a float64 copy whose entries hold their own indices (exact < 2**53)."""
    probe = copy_model(template).cpu().double()
    with torch.no_grad():
        for v in probe.state_dict().values():
            if v.is_floating_point():
                v.copy_(torch.arange(v.numel(), dtype=torch.float64).view_as(v))
    apply_plan(probe, plan, mode="physical")
    return {k: v.long() for k, v in probe.state_dict().items() if v.is_floating_point()}


def _model_for_step(template: nn.Module, plan: Plan, mode: str, prev_state: dict[str, torch.Tensor] | None,
                    prev_plan: Plan | None) -> nn.Module:
    """``template`` (unpruned) pruned by ``plan``, carrying ``prev_state`` (the model pruned by ``prev_plan``,
    a subset of ``plan``) into it: the weights fine-tuned so far, with the new step's channels removed.

    apply_plan only prunes unpruned models, so the previous weights are first written back into a full-size
    copy at their original positions (physical mode; mask mode keeps full shapes), then ``plan`` is applied.
    """
    model = copy_model(template)
    if prev_state is not None:
        full = {k: v.clone() for k, v in template.state_dict().items()}
        if mode == "physical" and prev_plan is not None:
            for key, index in _physical_index_maps(template, prev_plan).items():
                full[key].view(-1)[index.view(-1).to(full[key].device)] = prev_state[key].reshape(-1).to(full[key])
            for key, value in prev_state.items():
                if not value.is_floating_point():
                    full[key] = value.clone()
        else:
            full = {k: v.clone() for k, v in prev_state.items()}
        model.load_state_dict(full)
    return apply_plan(model, plan, mode=mode)


def fit_layerwise(model: nn.Module, plan: Plan, train_batches: Batches, val_batches: Batches | None,
                  recipe: Recipe, *, mode: str = "mask", out_dir: str | os.PathLike, resume: bool = False,
                  overwrite: bool = False, test_batches: Batches | None = None, select_on_test: bool = False,
                  run_info: dict[str, Any] | None = None, stop_after_epoch: int | None = None,
                  progress: bool = True, tensorboard: bool = True, teacher: nn.Module | None = None,
                  printer: Callable[[str], None] = print) -> tuple[nn.Module, FitResult]:
    """HRank's layer-by-layer fine-tuning: for each step of ``plan`` (``layerwise_steps``) prune it, fine-tune
    ``recipe.epochs`` epochs (a ``fit`` run in ``out_dir/step_NNN``), and start the next step from this
    step's best model. Works in ``mask`` (HRank's way) and ``physical`` mode.

    ``model`` is the unpruned, trained model (left untouched); the returned model is pruned by the whole
    plan, with the last step's selected weights, evaluated on ``test_batches``. ``resume`` continues at step
    granularity (and exactly inside an interrupted step); ``stop_after_epoch`` counts epochs over all steps.
    """
    dist = DistInfo.current()
    out_dir = Path(out_dir)
    steps = layerwise_steps(plan, model, recipe.layerwise_unit)
    if not steps:
        raise HRankError("the plan prunes nothing: there is no layer-wise step to run")
    names = [[m for g in step for m in g.members] for step in steps]
    state_path = out_dir / "layerwise.json"
    identity = {"plan": fingerprint(plan.to_json()), "mode": mode, "steps": names,
                "recipe": {k: v for k, v in recipe.to_json().items() if k != "name"}}
    done, history = 0, []
    # each step after the first starts from a global RNG state of its own (dropout, random augmentation in the
    # model), drawn from this seed, recorded so that a run resumed at a step boundary draws what the
    # uninterrupted run drew
    base_seed = torch.initial_seed()
    if state_path.exists():
        if not resume and not overwrite:
            raise HRankError(f"{out_dir} already holds a layer-wise run: pass --resume to continue it or --force "
                             "to start over")
        if resume:
            saved = json.loads(state_path.read_text(encoding="utf-8"))
            if saved["identity"] != identity:
                raise HRankError(f"cannot resume {out_dir}: it was started with another "
                                 + ", ".join(k for k in identity if saved["identity"].get(k) != identity[k])
                                 + " (nothing was changed; use another output directory)")
            done, history = int(saved["done"]), list(saved["history"])
            base_seed = int(saved.get("seed", base_seed))
    template = model
    prev_state, prev_plan = None, None
    if done:
        prev_plan = _partial_plan(plan, steps, done - 1)
        best = read_checkpoint(out_dir / f"step_{done:03d}" / "best.pt")
        prev_state = {k: v.to(_device_of(template)) for k, v in best["model"]["state_dict"].items()}

    def write_state() -> None:
        if dist.is_main:
            atomic_write_json(state_path, {"identity": identity, "done": done, "history": history,
                                           "seed": base_seed})

    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        printer(f"layer-wise fine-tuning: {len(steps)} steps x {recipe.epochs} epochs, {mode} mode"
                + (f", resuming at step {done + 1}" if done else ""))
    write_state()
    current = None
    for i in range(done, len(steps)):
        stop = None if stop_after_epoch is None else stop_after_epoch - i * recipe.epochs
        if stop is not None and stop <= 0:  # interrupted exactly between two steps
            return current or template, FitResult(0, float("nan"), "test" if select_on_test else "val", None, None,
                                                   i * recipe.epochs, 0.0, False, out_dir)
        plan_i = _partial_plan(plan, steps, i)
        current = _model_for_step(template, plan_i, mode, prev_state, prev_plan)
        if dist.is_main:
            printer(f"step {i + 1}/{len(steps)}: prune " + ", ".join(
                f"{g.members[0]}{f' (+{len(g.members) - 1} coupled)' if len(g.members) > 1 else ''} "
                f"{g.channels}->{g.width}" for g in steps[i]))
        step_dir = out_dir / f"step_{i + 1:03d}"
        if i > 0:
            torch.manual_seed((base_seed + 1_000_003 * i) % (1 << 63))
        res = fit(current, train_batches, val_batches, recipe, out_dir=step_dir,
                  resume=resume and (step_dir / "last.pt").exists(), overwrite=overwrite,
                  test_batches=test_batches if select_on_test else None, select_on_test=select_on_test,
                  run_info={**(run_info or {}), "step": i + 1, "steps": names[i]}, stop_after_epoch=stop,
                  progress=progress, tensorboard=tensorboard, save_final=False, teacher=teacher, printer=printer)
        if not res.completed:
            return current, res
        prev_state = {k: v.detach().clone() for k, v in _unwrap(current).state_dict().items()}
        prev_plan = plan_i
        done = i + 1
        history.append({"step": done, "convs": names[i], "best_epoch": res.best_epoch, "best": res.best_metric,
                        "seconds": res.seconds})
        write_state()
    if current is None:  # every step was already done: rebuild the final model from the last step's best
        current = _model_for_step(template, plan, mode, prev_state, plan)
    return current, _finish_layerwise(current, history, recipe.epochs, out_dir, train_batches, val_batches,
                                      test_batches, select_on_test, printer, dist)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _finish_layerwise(model: nn.Module, history: list[dict], epochs: int, out_dir: Path, train_batches: Batches,
                      val_batches: Batches | None, test_batches: Batches | None, select_on_test: bool,
                      printer: Callable[[str], None], dist: DistInfo) -> FitResult:
    # the final numbers are float32 whatever the recipe's autocast
    val = evaluate(model, _shard_eval(val_batches, dist), all_reduce=dist.enabled) if val_batches else None
    test = evaluate(model, _shard_eval(test_batches, dist), all_reduce=dist.enabled) if test_batches else None
    last = history[-1]
    result = FitResult(best_epoch=last["best_epoch"], best_metric=last["best"],
                       selected_on="test" if select_on_test else "val", val=val, test=test,
                       epochs_run=epochs * len(history), seconds=sum(h["seconds"] for h in history),
                       completed=True, out_dir=out_dir)
    if dist.is_main:
        save_model(model, out_dir / "model.pt", normalization=train_batches.norm,
                   extra={"layerwise_steps": len(history), "selected_on": result.selected_on, "val": val,
                          "test": test})
        atomic_write_json(out_dir / "summary.json", {**result.to_json(), "steps": history})
        printer(f"layer-wise fine-tuning done: {len(history)} steps in {_fmt_time(result.seconds)}"
                + (f"; validation top-1 {val['top1']:.2f}%" if val else "")
                + (f"; test top-1 {test['top1']:.2f}%, top-5 {test['top5']:.2f}%" if test else "")
                + (" (steps SELECTED ON THE TEST SET: biased)" if select_on_test else "")
                + f"; model in {out_dir / 'model.pt'}")
    _barrier(dist)
    return result

