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

from torch import nn

from hrank import config, criteria, datasets, flops, models, pipeline
from hrank.checkpoint import save
from hrank.cli.common import (
    NONNEG_INT,
    NUM_CLASSES,
    POSITIVE_INT,
    WORKERS,
    add_device_arg,
    finite_float,
    format_table,
    resolve_device,
)
from hrank.datasets import DataOptions
from hrank.errors import HRankError
from hrank.io import FreshOutput, atomic_write_json, check_output
from hrank.latency import LAYOUTS, RUNTIMES

ORDERS = config.KEYS["budget_order"].choices  # hrank.budget's, without importing it for --help
ORDER_DEFAULT = config.KEYS["budget_order"].default
MAX_RATE_DEFAULT = config.KEYS["max_rate"].default
ROUND_TO_DEFAULT = config.KEYS["round_to"].default


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune", help="prune a model by ranks and rates (physical or mask)",
        description="Make a plan (kept channels per coupled group) from ranks and compress rates, apply it "
                    "(physically by default, or as HRank's masks), optionally re-estimate BN statistics on "
                    "training images, and write DIR/plan.json, DIR/model.pt and DIR/summary.json.")
    p.add_argument("--model", required=True,
                   help=f"the model: a registry name ({', '.join(models.names())}), torchvision:NAME, timm:NAME or "
                        "package.module:factory")
    p.add_argument("--num-classes", type=NUM_CLASSES, default=None, help="classifier width (default: the arch's)")
    p.add_argument("--checkpoint", default=None,
                   help="weights of the unpruned model (any state_dict checkpoint, or a file from hrank.save)")
    src = p.add_argument_group("what to prune (ranks + rates, or a plan)")
    src.add_argument("--ranks", default=None,
                     help="ranks file from `hrank rank` (.npz), or an official rank_conv/<arch>/ folder")
    src.add_argument("--criterion", default="hrank", choices=criteria.names(),
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
    src.add_argument("--target-latency", type=finite_float, default=None,
                     help="instead of rates: find rates whose pruned model runs in this fraction of the dense "
                          "model's latency, measured on this machine (--latency-*; hrank.latency)")
    src.add_argument("--latency-runtime", default="torch", choices=RUNTIMES,
                     help="runtime the latency target is measured on (default %(default)s)")
    src.add_argument("--latency-batch", "--latency-target-batch", dest="latency_batch", type=POSITIVE_INT, default=1,
                     help="batch size the latency target is measured at (default %(default)s; `hrank run` calls "
                          "this --latency-target-batch, its --latency-batch is the report's timing batch)")
    src.add_argument("--latency-layout", default="channels_last", choices=LAYOUTS,
                     help="memory format of the torch runtime (default %(default)s)")
    src.add_argument("--latency-threads", type=POSITIVE_INT, default=None,
                     help="CPU threads of the latency target (default: torch's)")
    src.add_argument("--latency-cache", default=None,
                     help="folder of the per-layer latency tables (default: $HRANK_CACHE or ~/.cache/hrank)")
    src.add_argument("--max-rate", type=finite_float, default=None,
                     help=f"largest rate a budget search may give one group (default {MAX_RATE_DEFAULT})")
    src.add_argument("--budget-order", default=None, choices=ORDERS,
                     help=f"order in which a budget search takes channels (default {ORDER_DEFAULT}; "
                          "docs/pruning.md)")
    src.add_argument("--round-to", type=int, default=None,
                     help="a --target-macs/--target-params search keeps pruned widths at multiples of this; 1 = "
                          f"exact channels (default {ROUND_TO_DEFAULT}; a --target-latency search takes its widths "
                          "from the measurement instead)")
    src.add_argument("--plan", default=None, help="apply this plan JSON instead of making one")
    src.add_argument("--independent", action="store_true",
                     help="select each conv alone, ignoring coupling, as HRank does (mask mode only)")
    src.add_argument("--width-rule", default="mean", choices=["mean", "max", "min"],
                     help="a coupled group's rate from its members' rates (default %(default)s)")
    p.add_argument("--mode", default="physical", choices=["physical", "mask"],
                   help="physical: remove channels (default); mask: HRank's 0/1 masks, shapes unchanged")
    data = p.add_argument_group("data (optional): BN recalibration and accuracy before/after")
    data.add_argument("--dataset", default=None, choices=datasets.names(),
                      help="use this dataset (default when --data-dir is given: cifar10, imagefolder for ImageNet "
                           "models)")
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
    data.add_argument("--image-size", type=POSITIVE_INT, default=224,
                      help="image folders: crop size (default %(default)s)")
    data.add_argument("--resize-size", type=POSITIVE_INT, default=256,
                      help="image folders: evaluation resize before the centre crop (default %(default)s)")
    data.add_argument("--workers", type=WORKERS, default=4,
                      help="image folders: decoding processes per data loader (default %(default)s)")
    add_device_arg(p)
    p.add_argument("--out", required=True, help="output directory (plan.json, model.pt, summary.json)")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------------------

def _scores(args: argparse.Namespace, model: nn.Module) -> Any:
    if args.criterion != "hrank":
        if args.ranks:
            raise HRankError(f"--ranks is not used with --criterion {args.criterion}; drop one of them")
        if not args.checkpoint:
            print(f"note: --criterion {args.criterion} without --checkpoint scores freshly initialised weights")
        return pipeline.score_filters(model, args.criterion, seed=args.seed)
    if not args.ranks:
        raise HRankError("--ranks is required with --criterion hrank (or use --criterion l1/random, or --plan)")
    return pipeline.load_scores(args.ranks, model, args.model)


def _rate_options(args: argparse.Namespace, device: Any = None) -> pipeline.RateOptions:
    latency, cache = None, None
    if args.target_latency is not None:
        from hrank.latency import LatencySetup

        latency = LatencySetup(runtime=args.latency_runtime, batch_size=args.latency_batch,
                               layout=args.latency_layout, threads=args.latency_threads,
                               device="cpu" if device is None or args.latency_runtime == "onnxruntime" else str(device))
        cache = args.latency_cache or Path(os.environ.get("HRANK_CACHE") or Path.home() / ".cache" / "hrank")
    return pipeline.RateOptions(compress_rate=args.compress_rate, rates=args.rates, rates_file=args.rates_file,
                                ignore=args.ignore, target_macs=args.target_macs, target_params=args.target_params,
                                target_latency=args.target_latency, latency=latency, latency_cache=cache,
                                max_rate=MAX_RATE_DEFAULT if args.max_rate is None else args.max_rate,
                                budget_order=args.budget_order or ORDER_DEFAULT,
                                round_to=ROUND_TO_DEFAULT if args.round_to is None else args.round_to)


def _check_latency(args: argparse.Namespace, out: Path, device: Any) -> None:
    """The --target-latency flags, checked before the model is loaded: the combinations, the setup's bounds,
    and a latency cache that can be written and outlives --out."""
    from hrank.latency import check_cache_dir

    if args.mode == "mask":
        raise HRankError("--target-latency times the physically pruned model, but --mode mask keeps every channel "
                         "(zeroed) and runs at the dense model's speed; use --mode physical, or a --target-macs "
                         "budget for masks")
    if args.round_to is not None:
        raise HRankError("--round-to does not apply to --target-latency: a latency search keeps only the widths "
                         "it measured faster than every wider one (docs/pruning.md, section 3c); drop --round-to")
    rates = _rate_options(args, device)
    rates.latency.check()
    check_cache_dir(rates.latency_cache, out=out)


def _dataset(args: argparse.Namespace, ref: str) -> str:
    return args.dataset or ("imagefolder" if models.get_spec(ref).dataset == "imagenet" else "cifar10")


def _data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(root=args.data_dir, download=not args.no_download, val_size=0, seed=args.seed,
                       image_size=args.image_size, resize_size=args.resize_size, workers=args.workers)


def _check_data(args: argparse.Namespace) -> None:
    """The data flags, checked before any work: the dataset must be there (or downloadable)."""
    if args.dataset is None and args.data_dir is None:
        if args.eval_images is not None:
            raise HRankError("--eval-images needs data: give --data-dir (or --dataset)")
        return
    datasets.check(_dataset(args, args.model), _data_options(args))


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    out = out.resolve()  # "." and ".." have no name to rename beside
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
    from hrank.plan import Plan
    from hrank.spec import Spec

    t0 = time.time()
    out = check_output(args.out, force=args.force, is_dir=True, what="output")
    if args.plan and (args.ranks or args.compress_rate or args.rates_file or args.rates or args.independent):
        raise HRankError("--plan replaces --ranks/--compress-rate/--rates-file/--rates/--independent; give one way")
    targets = [t for t in (args.target_macs, args.target_params, args.target_latency) if t is not None]
    if len(targets) > 1:
        raise HRankError("give one of --target-macs, --target-params and --target-latency")
    target = targets[0] if targets else None
    if target is not None and (args.plan or args.compress_rate or args.rates_file or args.rates or args.independent):
        raise HRankError("a budget (--target-macs/--target-params/--target-latency) replaces --plan/--compress-rate/"
                         "--rates-file/--rates/--independent; give one way")
    if args.independent and args.mode == "physical":
        raise HRankError("--independent plans ignore coupling and are only valid with --mode mask")
    if args.round_to is not None and args.round_to < 1:  # a whole number (argparse), checked whatever the target
        raise HRankError(f"round_to must be a positive integer, got {args.round_to} (--round-to; 1 = exact channels)")
    if args.round_to is not None and target is None:
        raise HRankError("--round-to rounds the widths a --target-macs/--target-params search finds; rates given "
                         "directly or by --plan are used as they are: drop --round-to or give a target")
    search = [f for f, v in (("--max-rate", args.max_rate), ("--budget-order", args.budget_order)) if v is not None]
    if search and target is None:
        flags = "/".join(search)
        raise HRankError(f"{flags} {'tunes' if len(search) == 1 else 'tune'} a --target-macs/--target-params/"
                         f"--target-latency search; rates given directly or by --plan are used as they are: drop "
                         f"{flags} or give a target")
    device = resolve_device(args.device)
    if args.target_latency is not None:
        _check_latency(args, out, device)
    budget = None
    loaded = pipeline.load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                                 normalization=args.normalization, dataset=args.dataset)
    model, norm = loaded.model, loaded.normalization
    _check_data(args)  # cheap: missing data fails before ranks are read or a budget is searched

    if args.plan:
        plan = Plan.load(args.plan)
        spec = Spec.from_json(plan.spec, model) if plan.spec.get("rates") is not None else None
        if plan.arch and plan.arch != args.model:
            raise HRankError(f"the plan is for {plan.arch}, but --model is {args.model}")
    else:
        rates = _rate_options(args, device)
        if args.target_latency is not None:
            pipeline.check_rates(model, rates)  # a bad latency setup fails before the scores are read
        if target is None:
            pipeline.rates_spec(model, rates)  # bad rates fail before the ranks are read
        scores = _scores(args, model)
        result = pipeline.build_spec(model, rates, scores, progress=print)
        spec, budget = result.spec, result.budget
        if budget is not None:
            text = budget.hrank_string()
            print(f"budget: {budget.describe()}; rates: {text or 'see plan.json'}")
        plan = pipeline.make_plan(model, scores, spec, criterion=args.criterion,
                                  coupling="independent" if args.independent else "groups",
                                  width_rule=args.width_rule)
    for note in (spec.notes if spec is not None else ()):
        print(f"note: {note}")

    data = None
    if args.dataset is not None or args.data_dir is not None:
        data = pipeline.load_data(_dataset(args, args.model), _data_options(args))
        pipeline.check_classes(model, data.num_classes, data.test.name or "the dataset")
    result = pipeline.prune_model(model, plan, mode=args.mode, spec=spec,
                                  calibration=data.train if data is not None and not args.no_recalibrate else None,
                                  calibration_images=args.calib_images, eval_split=data.test if data else None,
                                  eval_images=args.eval_images, normalization=norm, device=device,
                                  batch_size=args.batch_size)
    model, before, after, rule = result.model, result.before, result.after, result.hrank_rule
    accuracy: dict[str, Any] = {}
    if "dense" in result.metrics:
        accuracy["dense"] = result.metrics["dense"]["top1"]
        accuracy["pruned"] = result.metrics["after_prune"]["top1"]
    if "after_recalibration" in result.metrics:
        accuracy["calibration_images"] = result.recalibrated_on
        accuracy["recalibrated"] = result.metrics["after_recalibration"]["top1"]

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
