"""HRank vs L1 vs random filter selection on the pretrained ResNet-56, at the same per-layer widths.

The real-data experiment of issue 6: the pretrained CIFAR-10 ResNet-56 (akamaster, ImageNet normalization)
is pruned to about half its MACs. The widths come from one budget search (``hrank.budget``), so the three
criteria differ only in *which* filters each layer keeps. For each criterion the script reports top-1
right after pruning, after BatchNorm recalibration, and after the same short fine-tune (best epoch chosen on
a 5,000-image validation split carved from the training set), on the 10k JPEG-derived test set and on the
1,000 exact-pixel test images. Everything runs in one process; results go to ``--out/results.json``.

    python bench/experiment_resnet56.py --data-dir ../shared/data/cifar10 \\
        --checkpoint ../shared/data/weights/resnet56-4bfd9763.th --epochs 3 --out runs/experiment
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

from hrank import flops, models, recipes
from hrank.budget import find_budget
from hrank.criteria import weight_scores
from hrank.data import Batches, Normalization, load_batch_files, load_cifar
from hrank.plan import make_plan
from hrank.prune import apply_plan, recalibrate_bn
from hrank.ranks import compute_ranks
from hrank.train import evaluate, fit, make_eval_batches, make_train_batches, split_train_val


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--checkpoint", default="../shared/data/weights/resnet56-4bfd9763.th")
    ap.add_argument("--lossless", default=None, help="exact-pixel test batch (default: DATA/lossless_subset/...)")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--criteria", default="hrank,l1,random")
    ap.add_argument("--budget-order", default=None, help="hrank.budget order (default: the library's)")
    ap.add_argument("--round-to", type=int, default=None,
                    help="width multiple of the budget search (default: the library's; 1 = exact channels)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--train-subset", type=int, default=None, help="fine-tune on this many training images")
    ap.add_argument("--rank-images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/experiment_resnet56")
    args = ap.parse_args()

    t_start = time.perf_counter()
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    norm = Normalization.get("imagenet")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_all = load_cifar(args.data_dir, "cifar10", "train", download=False)
    train, val = split_train_val(train_all, 5000, seed=args.seed)
    ft_train = train
    if args.train_subset:
        ft_train = train.subset(torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))
                                [: args.train_subset].sort().values)
    test = load_cifar(args.data_dir, "cifar10", "test", download=False)
    lossless_path = Path(args.lossless or Path(args.data_dir) / "lossless_subset" / "test_batch_first1000")
    lossless = load_batch_files([lossless_path], 10, name="lossless-1k")
    evals = {name: make_eval_batches(ds, normalization=norm, device=device)
             for name, ds in (("val", val), ("test", test), ("lossless", lossless))}

    def accuracy(model: torch.nn.Module, splits=("val", "test", "lossless")) -> dict[str, float]:
        model.to(device)
        return {s: evaluate(model, evals[s])["top1"] for s in splits}

    base = models.create("resnet_56")
    models.load_checkpoint(base, args.checkpoint)
    base.eval()
    results: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                                f"torch {torch.__version__}, {device}",
                     "baseline": {**accuracy(base), "macs": flops.count(base).macs, "params": flops.count(base).params}}
    print("baseline", results["baseline"], flush=True)

    t0 = time.perf_counter()
    ranks = compute_ranks(base, train, num_images=args.rank_images, seed=args.seed, normalization=norm,
                          device=device, progress=False)
    results["rank_seconds"] = time.perf_counter() - t0
    extra = {"order": args.budget_order} if args.budget_order else {}
    if args.round_to is not None:
        extra["round_to"] = args.round_to
    budget = find_budget(base, ranks, target=args.target_macs, metric="macs", **extra)
    results["spec"] = budget.hrank_string()
    results["macs"], results["params"] = budget.macs, budget.params
    print(f"widths: {results['spec']} -> {flops.format_count(budget.macs)} MACs "
          f"({budget.macs / budget.baseline:.1%})", flush=True)

    recipe = recipes.apply_overrides(recipes.get_preset("fast"), {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "lr_ref_batch": 0,
        "warmup_epochs": min(0.5, float(args.epochs))}, "experiment").validate()
    results["recipe"] = recipe.to_json()
    results["criteria"] = {}
    for criterion in args.criteria.split(","):
        t0 = time.perf_counter()
        scores = ranks if criterion == "hrank" else weight_scores(criterion, base, list(ranks.scores), seed=args.seed)
        plan = make_plan(base, scores, budget.spec, criterion=criterion)
        model = apply_plan(copy.deepcopy(base), plan, mode="physical")
        row: dict = {"after_prune": accuracy(model)}
        recalibrate_bn(model.to(device), Batches(train, 128, normalization=norm, train=True, device=device,
                                                 seed=args.seed + 2), 512)
        row["after_recalibration"] = accuracy(model)
        torch.manual_seed(args.seed)
        result = fit(model, make_train_batches(ft_train, recipe, normalization=norm, device=device, seed=args.seed),
                     evals["val"], recipe, out_dir=out / criterion, overwrite=True, test_batches=evals["test"],
                     progress=False, printer=lambda s: None)
        row["after_finetune"] = accuracy(model)
        row["best_epoch"] = result.best_epoch
        row["seconds"] = time.perf_counter() - t0
        results["criteria"][criterion] = row
        print(criterion, json.dumps(row), flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=2))

    results["total_seconds"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n| criterion | stage | val | test (10k JPEG) | lossless 1k |\n|---|---|---|---|---|")
    b = results["baseline"]
    print(f"| — | baseline | {b['val']:.2f} | {b['test']:.2f} | {b['lossless']:.2f} |")
    for criterion, row in results["criteria"].items():
        for stage in ("after_prune", "after_recalibration", "after_finetune"):
            r = row[stage]
            cells = " | ".join(f"{r[s]:.2f}" for s in ("val", "test", "lossless"))
            print(f"| {criterion} | {stage.replace('_', ' ')} | {cells} |")
    print(f"total {results['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
