"""Filter criteria x fine-tuning recipes on the pretrained ResNet-56, at the same per-layer widths.

The real-data experiment of issues 6 and 14: the pretrained CIFAR-10 ResNet-56 (akamaster, ImageNet
normalization) is pruned to about half its MACs. Per seed the widths come from one budget search
(``hrank.budget`` on that seed's HRank ranks), so the criteria (hrank, chip, l1, random) differ only in *which*
filters each layer keeps. Each pruned model is BN-recalibrated (512 training images) and fine-tuned with the
same short ``fast`` recipe, plain or distilled from the dense model (``--recipes plain,distill``); the dense
model itself is fine-tuned with the same recipe as the reference row (``dense``). Top-1 is reported on the
validation split after recalibration, and after fine-tuning (best epoch chosen on the 5,000-image validation
split carved from the training set) on validation, the 10k JPEG-derived test set and the 1,000 exact-pixel
test images. ``--adapt-images N`` first fine-tunes the dense model on N training images, and every cell then
prunes, distils from and fine-tunes that adapted model (with ``--minutes`` its time is charged to each cell).

Every cell (seed, criterion, recipe) is written to ``--out/seed<S>/<criterion>-<recipe>.json`` as soon as it is
done and skipped when it exists, so a stopped run resumes (a cell stopped during its fit continues from its
last epoch, bit-exact), and several processes can share the grid (e.g. one per seed). ``--summary`` prints the
table of every cell found, with the mean and the per-seed values.

    python bench/experiment_resnet56.py --epochs 2 --seeds 0 --out runs/experiment      # one process
    python bench/experiment_resnet56.py --seeds 1 --threads 1 --out runs/experiment &   # another, alongside
    python bench/experiment_resnet56.py --summary --out runs/experiment
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from hrank import flops, models, recipes
from hrank.budget import find_budget
from hrank.criteria import weight_scores
from hrank.data import Batches, Normalization, load_batch_files, load_cifar
from hrank.io import atomic_torch_save, atomic_write_json
from hrank.plan import make_plan
from hrank.prune import apply_plan, recalibrate_bn
from hrank.ranks import Ranks, compute_scores
from hrank.spec import Spec
from hrank.train import evaluate, fit, make_eval_batches, make_train_batches, split_train_val

CRITERIA = ("hrank", "chip", "l1", "random")
RECIPES = ("plain", "distill")
SPLITS = ("val", "test", "lossless")


def run_grid(args: argparse.Namespace) -> None:
    """Run every missing cell of the grid for the seeds asked, one seed after the other."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    norm = Normalization.get("imagenet")
    out = Path(args.out)
    criteria = [c for c in args.criteria.split(",") if c]
    recipe_names = [r for r in args.recipes.split(",") if r]
    bad = [c for c in criteria if c not in CRITERIA] + [r for r in recipe_names if r not in RECIPES]
    if bad:
        raise SystemExit(f"unknown criterion or recipe {bad[0]!r}")

    train_all = load_cifar(args.data_dir, "cifar10", "train", download=False)
    test = load_cifar(args.data_dir, "cifar10", "test", download=False)
    lossless_path = Path(args.lossless or Path(args.data_dir) / "lossless_subset" / "test_batch_first1000")
    lossless = load_batch_files([lossless_path], 10, name="lossless-1k")
    base = models.create("resnet_56")
    models.load_checkpoint(base, args.checkpoint)
    base.eval().to(device)
    machine = (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
               f"torch {torch.__version__}, {device}")

    for seed in (int(s) for s in args.seeds.split(",")):
        sdir = out / f"seed{seed}"
        cells = [(c, r) for c in criteria for r in recipe_names] + ([("dense", "plain")] if args.dense else [])
        todo = [(c, r) for c, r in cells if args.force or not (sdir / f"{c}-{r}.json").exists()]
        if not todo:
            print(f"seed {seed}: every cell done before, skipped", flush=True)
            continue
        torch.manual_seed(seed)
        train, val = split_train_val(train_all, 5000, seed=seed)
        ft_train = train
        if args.train_subset:
            pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[: args.train_subset]
            ft_train = train.subset(pick.sort().values)
        if args.val_images and args.val_images < len(val):
            val = val.subset(torch.arange(args.val_images))  # a smaller selection split: cheaper per cell
        evals = {name: make_eval_batches(ds, normalization=norm, device=device)
                 for name, ds in (("val", val), ("test", test), ("lossless", lossless))}

        def accuracy(model: torch.nn.Module, splits=SPLITS, evals=evals) -> dict[str, float]:
            model.to(device)
            return {s: evaluate(model, evals[s])["top1"] for s in splits}

        info_path = sdir / "setup.json"
        setup = json.loads(info_path.read_text()) if info_path.exists() else None
        if setup is not None and setup.get("adapt_images", 0) != args.adapt_images:  # scores of another model
            raise SystemExit(f"{info_path} was set up with --adapt-images {setup.get('adapt_images', 0)}, not "
                             f"{args.adapt_images}: use another --out")
        adapt = None
        src = base  # the model the cells prune, distil from and fine-tune as the dense row
        if args.adapt_images:  # the dense model first fine-tuned on this data: the source and the teacher
            src, adapt = _adapted(base, ft_train, evals["val"], args, norm, device, seed, sdir, accuracy)
        if setup is None:
            t0 = time.perf_counter()
            scores = compute_scores(src, train, ("hrank", "chip"), num_images=args.rank_images, seed=seed,
                                    normalization=norm, device=device, progress=False)
            score_seconds = time.perf_counter() - t0
            if args.rates:  # the widths given: counted on the model they prune to (any criterion's choice)
                widths = Spec.from_string(src, args.rates)
                pruned = apply_plan(copy.deepcopy(src), make_plan(src, scores["hrank"], widths), mode="physical")
                counts, spec_string, baseline = flops.count(pruned), args.rates, flops.count(src).macs
                macs, params = counts.macs, counts.params
            else:
                budget = find_budget(src, scores["hrank"], target=args.target_macs, metric="macs")
                spec_string, macs, params, baseline = (budget.hrank_string(), budget.macs, budget.params,
                                                       budget.baseline)
            setup = {"machine": machine, "seed": seed, "spec": spec_string, "macs": macs,
                     "params": params, "baseline_macs": baseline, "score_seconds": score_seconds,
                     "dense": accuracy(src), "adapt_images": args.adapt_images}
            for name, ranks in scores.items():
                ranks.save(sdir / f"{name}.npz")
            atomic_write_json(info_path, setup)
        if args.rates and setup["spec"] != args.rates:
            raise SystemExit(f"{info_path} records the widths {setup['spec']}, not --rates {args.rates}: "
                             f"use another --out")
        print(f"seed {seed}: widths {setup['spec']} -> {flops.format_count(setup['macs'])} MACs "
              f"({setup['macs'] / setup['baseline_macs']:.1%}); dense {setup['dense']}", flush=True)
        spec = Spec.from_string(src, setup["spec"])  # the recorded widths, the same for every cell of the seed
        saved = {name: Ranks.load(sdir / f"{name}.npz") for name in ("hrank", "chip")}

        for criterion, recipe_name in todo:
            t0 = time.perf_counter()
            recipe = recipes.apply_overrides(recipes.get_preset("fast"), {
                "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "lr_ref_batch": 0,
                "warmup_epochs": min(0.5, float(args.epochs)),
                "distill_weight": args.distill_weight if recipe_name == "distill" else 0.0,
                "distill_temperature": args.distill_temperature,
                "label_smoothing": args.label_smoothing}, "experiment").validate()
            cell_train = ft_train
            if criterion == "dense":
                model = copy.deepcopy(src)
                row: dict = {}
            else:
                if criterion in saved:
                    scores = saved[criterion]
                else:
                    scores = weight_scores(criterion, src, list(saved["hrank"].scores), seed=seed)
                plan = make_plan(src, scores, spec, criterion=criterion)
                model = apply_plan(copy.deepcopy(src), plan, mode="physical")
                row = {}
                recalibrate_bn(model.to(device), Batches(train, 128, normalization=norm, train=True, device=device,
                                                         seed=seed + 2), 512)
                row["after_recalibration"] = accuracy(model, ("val",))
            counts = flops.count(model)
            teacher = src if recipe.distill_weight > 0 else None
            if args.minutes:  # as many images as this model and recipe train in the budget, measured here
                rate_path = sdir / f"rate_{criterion}_{recipe_name}.json"  # no '-': not a cell for summary()
                rate = _rate(args.images_per_second, rate_path)  # given, or measured before by --measure-only
                if rate is None:
                    rate = _images_per_second(model, teacher, recipe, ft_train, norm, device, seed,
                                              sdir / f"{criterion}-{recipe_name}-calibration")
                    atomic_write_json(rate_path, {"images_per_second": rate, "machine": machine,
                                                  "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
                if args.measure_only:
                    print(f"seed {seed} {criterion} {recipe_name}: {rate:.1f} img/s (recorded in {rate_path})",
                          flush=True)
                    continue
                seconds = args.minutes * 60 - (adapt["seconds_charged"] if adapt else 0.0)
                if seconds <= 0:
                    raise SystemExit(f"the adaptation's {adapt['seconds_charged'] / 60:.1f} min leave nothing of "
                                     f"--minutes {args.minutes}")
                cell_train, recipe = _budget_epochs(ft_train, recipe, rate * seconds, seed)
                row["budget"] = {"minutes": args.minutes, "images_per_second": rate, "adapt": adapt,
                                 "images_seen": len(cell_train) * recipe.epochs,
                                 "epochs": recipe.epochs, "images_per_epoch": len(cell_train)}
                print(f"seed {seed} {criterion} {recipe_name}: {rate:.1f} img/s -> {recipe.epochs} epoch(s) of "
                      f"{len(cell_train)} images in {args.minutes} min", flush=True)
            torch.manual_seed(seed)
            t_fit = time.perf_counter()
            cell_dir = sdir / f"{criterion}-{recipe_name}"
            resumed = (cell_dir / "last.pt").exists() and not args.force  # a stopped fit continues (bit-exact)
            result = fit(model, make_train_batches(cell_train, recipe, normalization=norm, device=device, seed=seed),
                         evals["val"], recipe, out_dir=cell_dir, resume=resumed, overwrite=not resumed,
                         progress=False, printer=lambda s: None, teacher=teacher, tensorboard=False)
            fit_seconds = time.perf_counter() - t_fit
            if resumed:
                row["resumed"] = True  # fit_seconds is then the resumed part's
            after = accuracy(model, ("test", "lossless"))
            row.update({"after_finetune": {"val": result.val["top1"], **after}, "best_epoch": result.best_epoch,
                        "fit_seconds": fit_seconds,
                        "macs": counts.macs, "params": counts.params, "seconds": time.perf_counter() - t0,
                        "recipe": recipe.to_json(),
                        "train_images": len(cell_train), "machine": machine})
            atomic_write_json(sdir / f"{criterion}-{recipe_name}.json", row)
            print(f"seed {seed} {criterion} {recipe_name}: {json.dumps(row['after_finetune'])} "
                  f"({row['seconds'] / 60:.1f} min)", flush=True)


def _rate(given: float | None, recorded: Path) -> float | None:
    """The images/s given on the command line, else the one recorded in ``recorded`` (None: neither)."""
    if given is None and recorded.exists():
        return json.loads(recorded.read_text())["images_per_second"]
    return given


def _adapted(base: torch.nn.Module, train, val, args: argparse.Namespace, norm: Normalization,
             device: torch.device, seed: int, sdir: Path, accuracy) -> tuple[torch.nn.Module, dict]:
    """The dense model fine-tuned on ``--adapt-images`` training images (plain recipe, its own warm-up and
    cosine), done once per seed and kept in ``sdir``: the cells then prune it, distil from it and fine-tune it.

    With ``--minutes`` its time is charged to every cell at the dense model's one-process rate
    (``--adapt-rate``, else the seed's recorded dense rate), so a cell's budget is what the adaptation leaves.
    """
    model = copy.deepcopy(base)
    info_path, weights = sdir / "adapt.json", sdir / "adapted.pt"
    if info_path.exists() and weights.exists():
        info = json.loads(info_path.read_text())
        model.load_state_dict(torch.load(weights, map_location=device, weights_only=True))
    else:
        recipe = recipes.apply_overrides(recipes.get_preset("fast"), {
            "batch_size": args.batch_size, "lr": args.lr, "lr_ref_batch": 0, "distill_weight": 0.0,
            "label_smoothing": args.label_smoothing}, "adapt").validate()
        data, recipe = _budget_epochs(train, recipe, args.adapt_images, seed + 101)
        out_dir = sdir / "adapt"
        resumed = (out_dir / "last.pt").exists()
        t = time.perf_counter()
        torch.manual_seed(seed)
        fit(model, make_train_batches(data, recipe, normalization=norm, device=device, seed=seed + 101), val,
            recipe, out_dir=out_dir, resume=resumed, overwrite=not resumed, progress=False, printer=lambda s: None,
            tensorboard=False)
        info = {"images": len(data) * recipe.epochs, "epochs": recipe.epochs, "fit_seconds": time.perf_counter() - t,
                "after": accuracy(model), "recipe": recipe.to_json()}
        atomic_torch_save(model.state_dict(), weights)
        atomic_write_json(info_path, info)
    if args.minutes:
        rate = _rate(args.adapt_rate, sdir / "rate_dense_plain.json")
        if rate is None:
            raise SystemExit("--adapt-images with --minutes needs the dense model's rate: --adapt-rate, or a "
                             "recorded one (--measure-only --dense first)")
        info = {**info, "rate_charged": rate, "seconds_charged": info["images"] / rate}
    print(f"seed {seed}: adapted dense model ({info['images']} images): {json.dumps(info['after'])}", flush=True)
    return model.eval(), info


def _images_per_second(model: torch.nn.Module, teacher: torch.nn.Module | None, recipe: recipes.Recipe,
                       train, norm: Normalization, device: torch.device, seed: int, tmp: Path) -> float:
    """Training images per second of this model and recipe (teacher included), on this machine now.

    Two short fits on copies (4 and 20 batches); the difference of their wall times is the cost of 16 steps,
    free of the per-fit set-up, so the estimate is what the long run will pay per image.
    """
    probe = recipes.apply_overrides(recipe, {"epochs": 1, "warmup_epochs": 0.0}, "calibration").validate()
    seconds = []
    # the same one-batch validation in both fits: its cost cancels in the difference
    val = make_eval_batches(train.subset(torch.arange(min(len(train), 128))), normalization=norm, device=device)
    for n in (4, 20):
        sub = train.subset(torch.arange(n * recipe.batch_size) % len(train))
        t = time.perf_counter()
        fit(copy.deepcopy(model), make_train_batches(sub, probe, normalization=norm, device=device, seed=seed),
            val, probe, out_dir=tmp, overwrite=True, progress=False, printer=lambda s: None, teacher=teacher,
            tensorboard=False, save_final=False)
        seconds.append(time.perf_counter() - t)
    return 16 * recipe.batch_size / max(1e-9, seconds[1] - seconds[0])


def _budget_epochs(train, recipe: recipes.Recipe, images: float, seed: int):
    """The training set and recipe that see ``images`` images: whole epochs over every training image, the
    images beyond the last whole epoch spread over the epochs (a seeded draw repeated in each), the warm-up
    kept at the grid's 5,000 images."""
    n = len(train)
    epochs = max(1, int(images // n))
    per_epoch = max(recipe.batch_size, int(images / epochs) // recipe.batch_size * recipe.batch_size)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 11))
    if per_epoch >= n:
        index = torch.cat([torch.arange(n), order[: per_epoch - n].sort().values])
    else:
        index = order[:per_epoch].sort().values
    recipe = recipes.apply_overrides(recipe, {"epochs": epochs, "warmup_epochs": min(0.5, 5000 / per_epoch)},
                                     "budget").validate()
    return train.subset(index), recipe


def summary(out: Path) -> str:
    """The markdown table of every cell under ``out``: mean top-1 over the seeds and the per-seed values."""
    cells: dict[tuple[str, str], list[dict]] = {}
    seeds = sorted(p for p in out.glob("seed*") if p.is_dir())
    for sdir in seeds:
        for f in sorted(sdir.glob("*-*.json")):
            criterion, recipe = f.stem.split("-", 1)
            cells.setdefault((criterion, recipe), []).append({"seed": sdir.name[4:], **json.loads(f.read_text())})
    order = {c: i for i, c in enumerate(("dense",) + CRITERIA)}
    lines = ["| criterion | recipe | seeds | after recal. val | val | test (10k JPEG) | lossless 1k | "
             "test per seed | min per run |", "|---|---|---:|---:|---:|---:|---:|---|---:|"]

    def cell(rows: list[dict], stage: str, split: str) -> str:
        vals = [r[stage][split] for r in rows if stage in r]
        if not vals:
            return "—"
        spread = f" ±{(max(vals) - min(vals)) / 2:.2f}" if len(vals) > 1 else ""
        return f"{statistics.mean(vals):.2f}{spread}"

    for (criterion, recipe), rows in sorted(cells.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1])):
        per_seed = ", ".join(f"s{r['seed']} {r['after_finetune']['test']:.2f}" for r in rows)
        minutes = statistics.mean(r["seconds"] for r in rows) / 60
        lines.append(f"| {criterion} | {recipe} | {len(rows)} | {cell(rows, 'after_recalibration', 'val')} | "
                     f"{cell(rows, 'after_finetune', 'val')} | {cell(rows, 'after_finetune', 'test')} | "
                     f"{cell(rows, 'after_finetune', 'lossless')} | {per_seed} | {minutes:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--checkpoint", default="../shared/data/weights/resnet56-4bfd9763.th")
    ap.add_argument("--lossless", default=None, help="exact-pixel test batch (default: DATA/lossless_subset/...)")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--criteria", default=",".join(CRITERIA), help=f"any of {', '.join(CRITERIA)}")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="plain (cross-entropy) and/or distill")
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="also fine-tune the dense model with the plain recipe (the reference row)")
    ap.add_argument("--seeds", default="0", help="comma-separated seeds, run one after the other")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--distill-weight", type=float, default=0.5)
    ap.add_argument("--distill-temperature", type=float, default=4.0)
    ap.add_argument("--label-smoothing", type=float, default=0.0, help="cross-entropy label smoothing")
    ap.add_argument("--rates", default=None,
                    help="HRank rate string of the widths, instead of the --target-macs budget search's")
    ap.add_argument("--train-subset", type=int, default=None, help="fine-tune on this many training images")
    ap.add_argument("--val-images", type=int, default=None,
                    help="select epochs (and report val) on the first N of the 5,000 validation images")
    ap.add_argument("--minutes", type=float, default=None,
                    help="fine-tune each cell for as many images as it trains in this many minutes (measured "
                         "per cell on this machine; replaces --epochs; whole epochs over the training set)")
    ap.add_argument("--images-per-second", type=float, default=None,
                    help="with --minutes: this rate instead of measuring one (a variant, such as another --lr, then "
                         "sees exactly the images of the reference cell measured at this rate)")
    ap.add_argument("--measure-only", action="store_true",
                    help="with --minutes: measure and record each cell's rate, fit nothing (a later run with "
                         "--minutes uses the recorded rate, so rates can be measured one at a time on an idle machine "
                         "and the runs then share it)")
    ap.add_argument("--adapt-images", type=int, default=0,
                    help="first fine-tune the dense model on this many training images (plain recipe): every "
                         "cell then prunes it, distils from it and fine-tunes it (with --minutes its time is "
                         "charged to each cell at the dense rate)")
    ap.add_argument("--adapt-rate", type=float, default=None,
                    help="with --adapt-images and --minutes: the dense model's images/s to charge the adaptation at")
    ap.add_argument("--rank-images", type=int, default=500)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--force", action="store_true", help="redo cells that exist")
    ap.add_argument("--summary", action="store_true", help="print the table of the cells under --out and stop")
    ap.add_argument("--out", default="runs/experiment_resnet56")
    args = ap.parse_args()
    if args.images_per_second is not None and (not args.minutes or not args.images_per_second > 0):
        ap.error("--images-per-second needs --minutes and a positive rate")
    if args.measure_only and not args.minutes:
        ap.error("--measure-only needs --minutes")
    if not args.summary:
        t0 = time.perf_counter()
        run_grid(args)
        print(f"total {(time.perf_counter() - t0) / 60:.1f} min")
    print(summary(Path(args.out)))


if __name__ == "__main__":
    main()
