"""``hrank prune``: ranks (or another criterion) + rates -> plan -> pruned model, with a before/after report.

Everything is built in memory and written at the end into a temporary directory that is moved into place,
so a bad input never leaves a half-written output directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hrank import config, flops, models
from hrank.cli.common import NONNEG_INT, POSITIVE_INT, add_device_arg, finite_float, format_table, resolve_device
from hrank.data import Batches, Normalization, load_cifar
from hrank.errors import HRankError
from hrank.io import FreshOutput, atomic_write_json, check_output
from hrank.validate import check_finite

CRITERIA = ("hrank", "l1", "random")
ORDERS = config.KEYS["budget_order"].choices  # hrank.budget's, without importing it for --help
ORDER_DEFAULT = config.KEYS["budget_order"].default
ROUND_TO_DEFAULT = config.KEYS["round_to"].default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", help="prune a model by ranks and rates (physical or mask)",
        description="Make a plan (kept channels per coupled group) from ranks and compress rates, apply it "
                    "(physically by default, or as HRank's masks), optionally re-estimate BN statistics on "
                    "training images, and write DIR/plan.json, DIR/model.pt and DIR/summary.json.")
    p.add_argument("--model", required=True, help=f"architecture ({', '.join(models.names())})")
    p.add_argument("--num-classes", type=POSITIVE_INT, default=None, help="classifier width (default: the arch's)")
    p.add_argument("--checkpoint", default=None,
                   help="weights of the unpruned model (any state_dict checkpoint, or a file from hrank.save)")
    src = p.add_argument_group("what to prune (ranks + rates, or a plan)")
    src.add_argument("--ranks", default=None,
                     help="ranks file from `hrank rank` (.npz), or an official rank_conv/<arch>/ folder")
    src.add_argument("--criterion", default="hrank", choices=CRITERIA,
                     help="filter scores: hrank (needs --ranks), l1 (weight norms) or random (seeded)")
    src.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of --criterion random (default %(default)s)")
    src.add_argument("--compress-rate", default=None,
                     help="HRank list syntax, one rate per entry in HRank order, e.g. \"[0.1]+[0.60]*35+...\" "
                          "(see `hrank info --model NAME` for the order)")
    src.add_argument("--rates-file", default=None,
                     help="YAML/JSON file: PATTERN: RATE lines, or compress_rate:/rates: keys")
    src.add_argument("--rates", default=None,
                     help="\"PATTERN=RATE,...\" with glob patterns over conv names (overrides the above)")
    src.add_argument("--ignore", default=None,
                     help="\"PATTERN,...\": convs to leave alone, with every group they are coupled into "
                          "(glob patterns over conv names)")
    src.add_argument("--target-macs", default=None,
                     help="instead of rates: find rates that keep this many MACs on the real pruned network, "
                          "a fraction (0.5) or a count (62M)")
    src.add_argument("--target-params", default=None, help="as --target-macs, for parameters")
    src.add_argument("--max-rate", type=finite_float, default=0.9,
                     help="largest rate a budget search may give one group (default %(default)s)")
    src.add_argument("--budget-order", default=ORDER_DEFAULT, choices=ORDERS,
                     help="order in which a budget search takes channels (default %(default)s; docs/pruning.md)")
    src.add_argument("--round-to", type=int, default=ROUND_TO_DEFAULT,
                     help="a budget search keeps pruned widths at multiples of this; 1 = exact channels "
                          "(default %(default)s)")
    src.add_argument("--plan", default=None, help="apply this plan JSON instead of making one")
    src.add_argument("--independent", action="store_true",
                     help="select each conv alone, ignoring coupling, as HRank does (mask mode only)")
    src.add_argument("--width-rule", default="mean", choices=["mean", "max", "min"],
                     help="a coupled group's rate from its members' rates (default %(default)s)")
    p.add_argument("--mode", default="physical", choices=["physical", "mask"],
                   help="physical: remove channels (default); mask: HRank's 0/1 masks, shapes unchanged")
    data = p.add_argument_group("data (optional): BN recalibration and accuracy before/after")
    data.add_argument("--dataset", default=None, choices=["cifar10", "cifar100", "imagenet"],
                      help="use this dataset (default when --data-dir is given: cifar10, imagenet for resnet_50)")
    data.add_argument("--data-dir", default=None,
                      help="folder holding the dataset (default when --dataset is given: $HRANK_DATA or ./data)")
    data.add_argument("--no-download", action="store_true", help="never download; fail if the data is absent")
    data.add_argument("--normalization", default=None,
                      help="cifar or imagenet (default: what the checkpoint carries, else the arch's)")
    data.add_argument("--no-recalibrate", action="store_true", help="skip BN recalibration")
    data.add_argument("--calib-images", type=POSITIVE_INT, default=512,
                      help="training images for BN recalibration (default %(default)s)")
    data.add_argument("--eval-images", type=POSITIVE_INT, default=None, help="test images to evaluate (default: all)")
    data.add_argument("--batch-size", type=POSITIVE_INT, default=256,
                      help="batch size for data passes (default %(default)s)")
    add_device_arg(p)
    p.add_argument("--out", required=True, help="output directory (plan.json, model.pt, summary.json)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------------

def _load_scores(args: argparse.Namespace, model: nn.Module) -> Any:
    if args.criterion != "hrank":
        from hrank.criteria import weight_scores

        if args.ranks:
            raise HRankError(f"--ranks is not used with --criterion {args.criterion}; drop one of them")
        if not args.checkpoint:
            print(f"note: --criterion {args.criterion} without --checkpoint scores freshly initialised weights")
        return weight_scores(args.criterion, model, models.prunable_convs(model), seed=args.seed)
    if not args.ranks:
        raise HRankError("--ranks is required with --criterion hrank (or use --criterion l1/random, or --plan)")
    from hrank.ranks import Ranks

    path = Path(args.ranks)
    ranks = Ranks.from_official(path, args.model) if path.is_dir() else Ranks.load(path)
    ranks.validate(model)
    return ranks


def _make_spec(args: argparse.Namespace, model: nn.Module):
    from hrank.spec import Spec, parse_mapping_string

    spec = Spec.from_string(model, args.compress_rate) if args.compress_rate else None
    if args.rates_file:
        spec = Spec.from_file(model, args.rates_file, base=spec)
    if args.rates:
        spec = Spec.from_mapping(model, parse_mapping_string(args.rates), base=spec)
    if spec is None:
        raise HRankError("give the rates: --compress-rate, --rates-file and/or --rates (or --plan)")
    return spec.without(model, args.ignore) if args.ignore else spec


def _accuracy(model: nn.Module, batches: Batches, limit: int | None) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in batches:
            if limit is not None and total >= limit:
                break
            if limit is not None:
                x, y = x[: limit - total], y[: limit - total]
            correct += int((model(x).argmax(1) == y).sum())
            total += int(y.numel())
    model.train(was_training)
    return 100.0 * correct / max(1, total)


def _dataset(args: argparse.Namespace, arch_spec) -> str:
    return args.dataset or ("imagenet" if arch_spec.dataset == "imagenet" else "cifar10")


def _check_data(args: argparse.Namespace, arch_spec) -> None:
    """The data flags, checked before any work: a CIFAR folder must be there (or downloadable)."""
    if args.dataset is None and args.data_dir is None:
        if args.eval_images is not None:
            raise HRankError("--eval-images needs data: give --data-dir (or --dataset)")
        return
    if _dataset(args, arch_spec) != "imagenet":
        from hrank.data import check_cifar

        check_cifar(args.data_dir or os.environ.get("HRANK_DATA", "data"), _dataset(args, arch_spec),
                    download=not args.no_download)


def _data(args: argparse.Namespace, arch_spec, norm: Normalization, device: torch.device):
    """(calibration batches, test batches) or (None, None) when no data was asked for."""
    if args.dataset is None and args.data_dir is None:
        return None, None
    dataset = _dataset(args, arch_spec)
    root = args.data_dir or os.environ.get("HRANK_DATA", "data")
    if dataset == "imagenet":
        from hrank.data import imagenet_loader

        return (imagenet_loader(root, "train", args.batch_size, train=True, normalization=norm),
                imagenet_loader(root, "val", args.batch_size, train=False, normalization=norm))
    download = not args.no_download
    train = load_cifar(root, dataset, "train", download=download)
    test = load_cifar(root, dataset, "test", download=download)
    calib = Batches(train, min(args.batch_size, len(train)), normalization=norm, train=True, drop_last=False,
                    device=device)
    return calib, Batches(test, args.batch_size, normalization=norm, device=device)


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    if out.exists():
        if not force:  # checked at the start too; someone may have created it meanwhile
            raise HRankError(f"output directory {out} already exists (use --force to overwrite)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _mb(n: float) -> str:
    return flops.format_count(n)


def run(args: argparse.Namespace) -> int:
    from hrank.checkpoint import load_weights
    from hrank.plan import Plan, make_plan
    from hrank.prune import apply_plan, hrank_rule_counts, recalibrate_bn, save
    from hrank.spec import Spec

    t0 = time.time()
    out = check_output(args.out, force=args.force, is_dir=True, what="output")
    if args.plan and (args.ranks or args.compress_rate or args.rates_file or args.rates or args.independent):
        raise HRankError("--plan replaces --ranks/--compress-rate/--rates-file/--rates/--independent; give one way")
    target = args.target_macs if args.target_macs is not None else args.target_params
    if args.target_macs is not None and args.target_params is not None:
        raise HRankError("give --target-macs or --target-params, not both")
    if target is not None and (args.plan or args.compress_rate or args.rates_file or args.rates or args.independent):
        raise HRankError("a budget (--target-macs/--target-params) replaces --plan/--compress-rate/--rates-file/"
                         "--rates/--independent; give one way")
    if args.independent and args.mode == "physical":
        raise HRankError("--independent plans ignore coupling and are only valid with --mode mask")
    arch_spec = models.get_spec(args.model)
    device = resolve_device(args.device)
    budget = None

    model = models.create(args.model, num_classes=args.num_classes)
    ckpt_info: dict[str, Any] = {"normalization": None}
    if args.checkpoint:
        ckpt_info = load_weights(model, args.checkpoint)
        check_finite(model, f"checkpoint {args.checkpoint}")
    norm = Normalization.get(args.normalization or ckpt_info["normalization"] or arch_spec.normalization)
    _check_data(args, arch_spec)  # cheap: missing data fails before ranks are read or a budget is searched

    if args.plan:
        plan = Plan.load(args.plan)
        spec = Spec.from_json(plan.spec, model) if plan.spec.get("rates") is not None else None
        if plan.arch and plan.arch != args.model:
            raise HRankError(f"the plan is for {plan.arch}, but --model is {args.model}")
    elif target is not None:
        from hrank.budget import find_budget

        scores = _load_scores(args, model)
        budget = find_budget(model, scores, target=target, metric="macs" if args.target_macs is not None else "params",
                             max_rate=args.max_rate, order=args.budget_order, round_to=args.round_to, progress=print,
                             ignore=args.ignore)
        spec = budget.spec
        text = budget.hrank_string()
        print(f"budget: {budget.describe()}; rates: {text or 'see plan.json'}")
        plan = make_plan(model, scores, spec, criterion=args.criterion, width_rule=args.width_rule)
    else:
        spec = _make_spec(args, model)
        scores = _load_scores(args, model)
        plan = make_plan(model, scores, spec, criterion=args.criterion,
                         coupling="independent" if args.independent else "groups", width_rule=args.width_rule)
    for note in (spec.notes if spec is not None else ()):
        print(f"note: {note}")

    input_size = tuple(plan.input_size)
    before = flops.count(model, input_size)
    rule = hrank_rule_counts(model, spec, input_size) if spec is not None else {}
    calib, test = _data(args, arch_spec, norm, device)
    model.to(device)
    accuracy: dict[str, Any] = {}
    if test is not None:
        accuracy["dense"] = _accuracy(model, test, args.eval_images)

    apply_plan(model, plan, mode=args.mode)
    after = flops.count(model, input_size)
    if test is not None:
        accuracy["pruned"] = _accuracy(model, test, args.eval_images)
        if calib is not None and not args.no_recalibrate:
            accuracy["calibration_images"] = recalibrate_bn(model, calib, num_images=args.calib_images)
            accuracy["recalibrated"] = _accuracy(model, test, args.eval_images)
    model.cpu().eval()

    rows = [[g_member, g.channels, g.width, f"{g.rate:.3f}", g.members[0] if len(g.members) > 1 else ""]
            for g in plan.groups for g_member in g.members]
    print(f"{plan.summary()} (criterion {plan.criterion}, width rule {plan.width_rule}, "
          f"mode {args.mode})")
    print(format_table(["layer", "channels", "kept", "rate", "coupled with"], rows, align="lrrrl"))
    for line in plan.skipped_lines(limit=20):
        print(f"skipped: {line}")
    print(f"before: {_mb(before.macs)} MACs, {_mb(before.params)} params")
    if args.mode == "physical":
        print(f"after:  {_mb(after.macs)} MACs ({100 * (1 - after.macs / before.macs):.1f}% fewer), "
              f"{_mb(after.params)} params ({100 * (1 - after.params / before.params):.1f}% fewer)  [real network]")
    else:
        print(f"after:  {_mb(after.macs)} MACs, {_mb(after.params)} params  [mask mode: shapes and speed unchanged]")
    if "as_pruned" in rule:
        c = rule["as_pruned"]
        print(f"HRank's counting rule (output channels only): {_mb(c.macs)} MACs, {_mb(c.params)} params")
    if "official_counter" in rule:
        c = rule["official_counter"]
        print(f"  the official counter prints {_mb(c.macs)} MACs, {_mb(c.params)} params (it reads inception "
              f"c4's rate from the next entry)")
    if accuracy:
        line = f"accuracy: dense {accuracy['dense']:.2f}%, pruned {accuracy['pruned']:.2f}%"
        if "recalibrated" in accuracy:
            line += f", after BN recalibration on {accuracy['calibration_images']} images " \
                    f"{accuracy['recalibrated']:.2f}%"
        print(line)

    summary = {
        "arch": args.model, "mode": args.mode, "coupling": plan.coupling, "width_rule": plan.width_rule,
        "criterion": plan.criterion, "checkpoint": args.checkpoint, "ranks": args.ranks,
        "spec": plan.spec, "normalization": norm.to_json(),
        "before": {"macs": before.macs, "params": before.params},
        "after": {"macs": after.macs, "params": after.params},
        "hrank_rule": {k: {"macs": v.macs, "params": v.params} for k, v in rule.items()},
        "accuracy": accuracy,
        "budget": budget.to_json() if budget is not None else None,
        "layers": [{"layer": m, "channels": g.channels, "kept": g.width, "rate": g.rate, "group": g.members[0]}
                   for g in plan.groups for m in g.members],
        "seconds": round(time.time() - t0, 2),
    }
    parent = FreshOutput.of(out.parent) if not out.parent.exists() else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plan.save(tmp / "plan.json")
        save(model, tmp / "model.pt", normalization=norm, extra={"source": "hrank prune", "summary": {
            k: summary[k] for k in ("before", "after", "hrank_rule", "accuracy")}})
        atomic_write_json(tmp / "summary.json", summary)
        _move_into_place(tmp, out, args.force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if parent is not None:  # no empty directories left behind either
            parent.undo()
        raise
    print(f"wrote {out}/plan.json, {out}/model.pt, {out}/summary.json")
    return 0
