"""``hrank train``, ``hrank finetune`` and ``hrank eval``: argument parsing; the work is in ``hrank.train``.

All three run under ``torchrun`` unchanged (``torchrun --nproc-per-node 4 -m hrank finetune ...``): each
process joins the group, only rank 0 writes and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from hrank import datasets, models, pipeline, recipes
from hrank.cli.common import (
    NONNEG_INT,
    NUM_CLASSES,
    POSITIVE_INT,
    add_data_args,
    add_device_arg,
    format_table,
    resolve_device,
)
from hrank.data import Normalization, load_batch_files
from hrank.datasets import DataOptions
from hrank.distributed import init_distributed, on_main, process_group_scope
from hrank.errors import HRankError
from hrank.io import (
    FreshOutput,
    OutputLock,
    atomic_write_json,
    check_output,
    check_writable,
    holds_anything,
    prepare_output,
    read_json,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a baseline from scratch",
                       description="Train a registered architecture from random initialisation (recipe "
                                   "'scratch' by default), selecting the best epoch on a validation split "
                                   "carved from the training set; evaluate it on the test set.")
    p.add_argument("--model", required=True, help=f"architecture ({', '.join(models.names())})")
    p.add_argument("--num-classes", type=NUM_CLASSES, default=None, help="classifier width (default: the dataset's)")
    _add_run_args(p, default_recipe="scratch")
    p.set_defaults(func=run_train)

    p = sub.add_parser("finetune", help="fine-tune a pruned model (one-shot or layer-wise)",
                       description="Fine-tune a model saved by hrank (pruned, physical or mask), or a "
                                   "registry model + checkpoint with an optional --plan applied here: "
                                   "one-shot, or layer by layer when the recipe says so (recipe 'hrank').")
    _add_model_source(p)
    p.add_argument("--plan", default=None, help="plan JSON to apply to the loaded (unpruned) model")
    p.add_argument("--mode", choices=["physical", "mask"], default="physical",
                   help="how --plan is applied: physical (remove channels) or mask (HRank's zero masks)")
    p.add_argument("--distill", action="store_true",
                   help="distill the unpruned model into the pruned one (distill_weight 0.5 unless "
                        "--distill-weight says otherwise); the teacher is --teacher, else the --model/--checkpoint "
                        "model before --plan is applied")
    p.add_argument("--teacher", default=None,
                   help="the teacher for distillation: a model file written by hrank (e.g. a run's baseline.pt)")
    _add_run_args(p, default_recipe="fast")
    p.set_defaults(func=run_finetune)

    p = sub.add_parser("eval", help="top-1, top-5, loss and per-class accuracy of a model",
                       description="Evaluate a model on the test set, the training set, the validation "
                                   "split carved from it, or a CIFAR-format batch file.")
    _add_model_source(p)
    p.add_argument("--split", default="test",
                   help="test, train, val (the seeded split of --val-size images carved from train), or the "
                        "path of a CIFAR-format batch file (default %(default)s)")
    p.add_argument("--val-size", type=NONNEG_INT, default=None,
                   help="validation split size for --split val/train (default 5000, or a tenth of smaller "
                        "training sets)")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the validation split (default %(default)s)")
    p.add_argument("--normalization", default=None,
                   help="cifar or imagenet (default: what the model file carries, else the arch's)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=500, help="evaluation batch size (default %(default)s)")
    p.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    add_data_args(p)
    add_device_arg(p)
    p.set_defaults(func=run_eval)


def _add_model_source(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (one of)")
    g.add_argument("--model-file", default=None, help="a model saved by hrank (pruned or not), or a training "
                                                      "run's best.pt/last.pt")
    g.add_argument("--model", default=None, help="architecture (registry name, torchvision:NAME, timm:NAME, "
                                                 "module:factory), with --checkpoint; with --model-file, the "
                                                 "module:factory that file was built from (hrank never imports "
                                                 "code a file names)")
    g.add_argument("--checkpoint", default=None, help="weights for --model (any state_dict checkpoint)")
    g.add_argument("--num-classes", type=NUM_CLASSES, default=None, help="classifier width for --model")


def _add_run_args(p: argparse.ArgumentParser, default_recipe: str) -> None:
    p.add_argument("--out", required=True, help="run directory (checkpoints, metrics, final model)")
    p.add_argument("--recipe", default=None, choices=list(recipes.PRESETS),
                   help=f"preset (default {default_recipe}; or the config file's 'recipe:' key)")
    p.add_argument("--config", default=None, help="YAML file of recipe keys overriding the preset")
    g = p.add_argument_group("recipe overrides (each overrides the preset and the config file)")
    for key in recipes.KEYS:
        flag = "--" + key.replace("_", "-")
        kind = recipes.field_type(key)
        help_text = recipes.field_help(key)
        if kind == "bool":
            g.add_argument(flag, dest=f"r_{key}", action=argparse.BooleanOptionalAction, default=None,
                           help=help_text)
        elif kind.startswith("tuple"):
            g.add_argument(flag, dest=f"r_{key}", type=_int_list, default=None, metavar="E1,E2",
                           help=help_text + " (comma-separated)")
        else:
            choices = recipes.field_choices(key)
            g.add_argument(flag, dest=f"r_{key}", type={"int": int, "float": float}.get(kind, str), default=None,
                           choices=choices, metavar=None if choices else key.upper(), help=help_text)
    p.add_argument("--val-size", type=NONNEG_INT, default=None,
                   help="images carved from the training set for model selection (default 5000, or a tenth "
                        "of smaller training sets; 0 needs --select-on-test)")
    p.add_argument("--train-subset", type=POSITIVE_INT, default=None, metavar="N",
                   help="train on a seeded subset of N images of the training split (quick experiments)")
    p.add_argument("--select-on-test", action="store_true",
                   help="select the best epoch on the TEST set, as the official code did (biased; announced "
                        "in the output)")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed for the split, data order, augmentation and init")
    p.add_argument("--normalization", default=None,
                   help="cifar or imagenet (default: what the model file carries, else the arch's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--force", action="store_true", help="delete an existing --out and start over")
    p.add_argument("--stop-after", type=POSITIVE_INT, default=None, metavar="EPOCH",
                   help="stop after this epoch as if interrupted (continue later with --resume)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines remain)")
    add_data_args(p)
    add_device_arg(p)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace(" ", "").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _recipe(args: argparse.Namespace, default: str) -> recipes.Recipe:
    overrides = {k: getattr(args, f"r_{k}") for k in recipes.KEYS if getattr(args, f"r_{k}") is not None}
    return recipes.resolve(args.recipe, args.config, overrides, default=default)


# ---------------------------------------------------------------------------------------------------

def _data_options(args: argparse.Namespace, val_size: int | None = None) -> DataOptions:
    return DataOptions(root=args.data_dir, download=not args.no_download, val_size=val_size, seed=args.seed,
                       train_subset=getattr(args, "train_subset", None), image_size=args.image_size,
                       resize_size=args.resize_size, workers=args.workers)


def _check_out(args: argparse.Namespace) -> Path:
    """Every check of --out, writing nothing: contradicting flags, a file, a run that --resume cannot continue,
    a non-empty directory without --resume/--force, a place that cannot be written."""
    out = Path(args.out)
    if args.resume and args.force:
        raise HRankError("--resume and --force contradict each other (continue the run, or delete it)")
    if out.exists() and not out.is_dir():
        raise HRankError(f"--out {out} is a file, expected a directory")
    if holds_anything(out):
        if args.resume:
            _check_run_dir(out)
        elif not args.force:
            raise HRankError(f"output directory {out} already exists and is not empty (use --resume to continue "
                             "the run in it or --force to start over)")
    check_writable(out, "output directory")
    return out


def _check_run_dir(out: Path) -> None:
    """--resume into a non-empty directory: it must hold a run hrank train/finetune started (config.json, or
    layerwise.json for a layer-wise run), else nothing is touched."""
    for name, keys in (("config.json", ("recipe", "run")), ("layerwise.json", ("identity", "done"))):
        if (out / name).is_file():
            data = read_json(out / name, "run file")
            if not isinstance(data, dict) or not all(k in data for k in keys):
                raise HRankError(f"--resume: {out / name} was not written by hrank train/finetune; {out} is not a "
                                 "training run directory (nothing was changed; use another --out)")
            return
    raise HRankError(f"--resume: {out} is not empty and holds no hrank training run (no config.json); nothing was "
                     "changed (use another --out, or --force to replace it)")


def _holds_progress(out: Path) -> bool:
    """Whether a training run in ``out`` has saved anything worth resuming (a checkpoint, at any depth)."""
    return out.is_dir() and any(out.rglob("last.pt"))


def load_model_source(args: argparse.Namespace) -> pipeline.LoadedModel:
    """The model named by --model-file, or --model + --checkpoint."""
    if args.model_file and args.checkpoint:
        raise HRankError("give either --model-file or --model with --checkpoint, not both")
    if not args.model_file:
        if not args.model:
            raise HRankError("no model: give --model-file, or --model with --checkpoint")
        if not args.checkpoint:
            raise HRankError(f"--model {args.model} needs --checkpoint (to train from scratch use hrank train)")
    return pipeline.load_model(args.model, checkpoint=args.checkpoint, model_file=args.model_file,
                               num_classes=args.num_classes, normalization=args.normalization, dataset=args.dataset)


def _run_fit(args: argparse.Namespace, model: torch.nn.Module, recipe: recipes.Recipe,
             normalization: Normalization, run_info: dict[str, Any], *, plan: Any = None,
             mode: str = "physical", teacher: torch.nn.Module | None = None) -> int:
    if recipe.layerwise and plan is None:
        raise HRankError("layer-wise fine-tuning prunes step by step and needs the unpruned model and a "
                         "plan: pass --plan (or use a one-shot recipe, e.g. --no-layerwise)")
    dist, device = init_distributed(args.device)
    with process_group_scope():
        # every check first; only then is anything written (or, with --force, the old run deleted)
        out = _check_out(args)
        fresh = FreshOutput.of(out)  # None when --out holds something
        if args.train_subset is not None:
            run_info = {**run_info, "train_subset": args.train_subset}
        data = pipeline.load_data(args.dataset, _data_options(args, args.val_size))
        if args.train_subset is not None and args.train_subset > len(data.train):
            raise HRankError(f"--train-subset must be in 1..{len(data.train)}, got {args.train_subset}")
        pipeline.check_classes(model, data.num_classes, data.test.name or args.dataset)
        run_info = {**run_info, "dataset": args.dataset, "seed": args.seed, "normalization": normalization.name}
        lock = OutputLock(out)  # rank 0 holds it: the same command started twice stops here, before writing
        on_main(lock.acquire, dist)
        try:
            if args.force and fresh is None and dist.is_main:
                prepare_output(out, force=True, is_dir=True)
                fresh = FreshOutput.of(out)
            try:
                pipeline.finetune(model, data, recipe, normalization=normalization, device=device, out_dir=out,
                                  seed=args.seed, plan=plan, mode=mode, resume=args.resume, overwrite=args.force,
                                  select_on_test=args.select_on_test, run_info=run_info,
                                  stop_after=args.stop_after, progress=not args.no_progress and dist.is_main,
                                  teacher=teacher)
            except HRankError:
                if fresh is not None and dist.is_main and not _holds_progress(out):  # nothing to resume: as it was
                    fresh.undo()
                raise
        finally:
            lock.release()
        return 0


def run_train(args: argparse.Namespace) -> int:
    recipe = _recipe(args, "scratch")
    num_classes = args.num_classes or {"cifar10": 10, "cifar100": 100}.get(args.dataset)
    if num_classes is None:  # image folders: one class per folder
        num_classes = datasets.load(args.dataset, _data_options(args, 0)).num_classes
    torch.manual_seed(args.seed)  # the same initial weights on every process and on every rerun
    model = models.create(args.model, num_classes=num_classes)
    norm = Normalization.get(args.normalization or pipeline.default_normalization(args.model, args.dataset))
    return _run_fit(args, model, recipe, norm, {"task": "train", "model": args.model})


def run_finetune(args: argparse.Namespace) -> int:
    if args.distill and args.r_distill_weight is None:
        args.r_distill_weight = 0.5
    recipe = _recipe(args, "fast")
    loaded = load_model_source(args)
    model = loaded.model
    teacher = _teacher(args, recipe, loaded)
    plan = None
    if args.plan:
        from hrank.plan import Plan

        if loaded.plan is not None:
            raise HRankError(f"{args.model_file} is already pruned; --plan applies to an unpruned model")
        plan = Plan.load(args.plan)
        if not recipe.layerwise:
            from hrank.prune import apply_plan

            model = apply_plan(model, plan, mode=args.mode)
            plan = None
    elif recipe.layerwise:
        raise HRankError(f"recipe {recipe.name!r} is layer-wise: it needs the unpruned model and --plan (a pruned "
                         "model file cannot be pruned step by step); or pass --no-layerwise")
    return _run_fit(args, model, recipe, loaded.normalization, {"task": "finetune"}, plan=plan, mode=args.mode,
                    teacher=teacher)


def _teacher(args: argparse.Namespace, recipe: recipes.Recipe, loaded: pipeline.LoadedModel) -> Any:
    """The unpruned model to distill from: --teacher, else the loaded model itself before --plan prunes it."""
    if args.teacher and recipe.distill_weight <= 0:
        raise HRankError("--teacher is only used for distillation: add --distill (or --distill-weight W)")
    if recipe.distill_weight <= 0:
        return None
    if args.teacher:
        teacher = pipeline.load_model(model_file=args.teacher)
        if teacher.plan is not None:
            raise HRankError(f"--teacher {args.teacher} is a pruned model; distill from the unpruned one")
        return teacher.model
    if args.plan and loaded.plan is None:
        from hrank.modelcopy import copy_model

        return copy_model(loaded.model)  # the unpruned model, before the plan is applied below
    raise HRankError("distillation needs the unpruned model as teacher: pass --teacher FILE (e.g. a run's "
                     "baseline.pt), or prune here with --model, --checkpoint and --plan")


def run_eval(args: argparse.Namespace) -> int:
    if args.json:  # before any work: an existing file is kept unless --force
        check_output(args.json, force=args.force, what="--json")
    loaded = load_model_source(args)
    model, norm = loaded.model, loaded.normalization
    device = resolve_device(args.device)
    if args.split in ("test", "train", "val"):
        data = pipeline.load_data(args.dataset, _data_options(args, 0 if args.split == "test" else args.val_size))
        split = {"test": data.test, "train": data.train, "val": data.val}[args.split]
        if split is None:
            raise HRankError("--split val with --val-size 0 is empty")
        what = f"{args.dataset} {args.split}" + (f" (seed {args.seed})" if args.split != "test" else "")
    else:
        path = Path(args.split)
        if not path.is_file():
            raise HRankError(f"--split must be test, train, val or a CIFAR batch file; {args.split!r} is none")
        num_classes = {"cifar10": 10, "cifar100": 100}.get(args.dataset, 10)
        key = b"fine_labels" if args.dataset == "cifar100" else b"labels"
        split = load_batch_files([path], num_classes, label_key=key, meta=_meta_file(args), name=path.name,
                                 names_key=b"fine_label_names" if args.dataset == "cifar100" else b"label_names")
        what = str(path)
    pipeline.check_classes(model, split.num_classes, getattr(split, "name", "") or what)
    m = pipeline.evaluate_split(model, split, normalization=norm, device=device, batch_size=args.batch_size)
    print(f"{what}: {m['count']} images, normalization {norm.name}")
    print(f"top-1 {m['top1']:.2f}%   top-5 {m['top5']:.2f}%   loss {m['loss']:.4f}")
    rows = [[name, "-" if acc is None else f"{acc:.2f}"] for name, acc in zip(split.classes, m["per_class"],
                                                                              strict=True)]
    print(format_table(["class", "top-1 %"], rows, align="lr"))
    if args.json:
        atomic_write_json(args.json, {"split": what, "normalization": norm.to_json(),
                                      "classes": split.classes, **m})
    return 0


def _meta_file(args: argparse.Namespace) -> Path | None:
    """The dataset folder's meta file (class names) for a loose batch file, when present."""
    from hrank.data import SOURCES

    src = SOURCES.get(args.dataset)
    if src is None:
        return None
    for folder in (Path(args.data_dir) / src.folder, Path(args.data_dir)):
        if (folder / src.meta_file).exists():
            return folder / src.meta_file
    return None
