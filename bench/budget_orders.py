"""Budget orders compared on pretrained CIFAR ResNets: the widths each order gives at the same MACs target,
what they keep in parameters, and the accuracy right after pruning (BN recalibrated) and, optionally, after a
short fine-tune.

``hrank.budget.find_budget`` turns a MACs target into per-group widths; its ``order`` decides where the MACs
come from. ``coupled`` (the default) halves the block-internal convs evenly; ``capacity`` takes them first where
a channel holds few parameters per MAC (stage 1 of a ResNet) and keeps more parameters at the same MACs. Every
layout prunes the same pretrained model with the same L1 scores; extra hand-written layouts (``--rates``)
join the ResNet-56 rows. The numbers are printed per model with each layout's difference to ``coupled``.

    python bench/budget_orders.py --threads 1
    python bench/budget_orders.py --archs resnet_56 --epochs 1 --threads 1 \\
        --rates "[0.0]+[0.75,0.0]*9+[0.5,0.0]*9+[0.25,0.0]*9"
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from hrank import budget, flops, models, recipes
from hrank.budget import find_budget
from hrank.criteria import l1_scores
from hrank.data import Batches, Normalization, load_cifar
from hrank.plan import make_plan
from hrank.prune import apply_plan, recalibrate_bn
from hrank.spec import Spec
from hrank.train import evaluate, fit, make_eval_batches, make_train_batches, split_train_val

WEIGHTS = {"resnet_20": "resnet20-12fca82f.th", "resnet_32": "resnet32-d509ac18.th",
           "resnet_44": "resnet44-014dd654.th", "resnet_56": "resnet56-4bfd9763.th"}


def layouts(base: torch.nn.Module, scores: dict, target: float, orders: list[str], round_tos: list[int],
            extra: list[str]) -> list[tuple[str, Spec]]:
    """(label, spec) of every order x rounding at the target, then the hand-written layouts."""
    out = []
    for order in orders:
        for round_to in round_tos:
            result = find_budget(base, scores, target=target, metric="macs", order=order, round_to=round_to)
            out.append((f"{order}, round_to {round_to}", result.spec))
    for rates in extra:
        out.append((f"hand: {rates}", Spec.from_string(base, rates)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--weights-dir", default="../shared/data/weights")
    ap.add_argument("--archs", default=",".join(WEIGHTS))
    ap.add_argument("--orders", default="coupled,capacity,uniform")
    ap.add_argument("--round-to", default="8,1", help="comma-separated round_to values")
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--rates", nargs="*", default=[], help="hand-written layouts for the ResNet-56 rows")
    ap.add_argument("--epochs", type=int, default=0, help="also fine-tune each layout this many epochs (fast)")
    ap.add_argument("--capacity-exponent", type=float, default=None,
                    help="weight of params per MAC in the capacity order (default: hrank.budget's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.capacity_exponent is not None:
        budget.CAPACITY_EXPONENT = args.capacity_exponent
    norm = Normalization.get("imagenet")
    train_all = load_cifar(args.data_dir, "cifar10", "train", download=False)
    test = load_cifar(args.data_dir, "cifar10", "test", download=False)
    train, val = split_train_val(train_all, 5000, seed=args.seed)
    cpu = torch.device("cpu")
    evals = {"val": make_eval_batches(val, normalization=norm, device=cpu),
             "test": make_eval_batches(test, normalization=norm, device=cpu)}
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; L1 scores, BN recalibrated on 512 training images, seed {args.seed}; capacity "
          f"exponent {budget.CAPACITY_EXPONENT:g}", flush=True)
    rows = []
    for arch in args.archs.split(","):
        base = models.create(arch)
        models.load_checkpoint(base, str(Path(args.weights_dir) / WEIGHTS[arch]))
        base.eval()
        dense = flops.count(base)
        scores = l1_scores(base)
        extra = args.rates if arch == "resnet_56" else []
        print(f"\n{arch}: dense {flops.format_count(dense.macs)} MACs, {flops.format_count(dense.params)} params")
        print("| layout | MACs | params | val after recal. | test after recal. |"
              + (f" val after {args.epochs} ep | test after {args.epochs} ep |" if args.epochs else ""))
        reference = None
        for label, spec in layouts(base, scores, args.target_macs, args.orders.split(","),
                                   [int(r) for r in args.round_to.split(",")], extra):
            t0 = time.perf_counter()
            model = apply_plan(copy.deepcopy(base), make_plan(base, scores, spec, criterion="l1"), mode="physical")
            counts = flops.count(model)
            recalibrate_bn(model, Batches(train, 128, normalization=norm, train=True, device=cpu, seed=args.seed + 2),
                           512)
            row = {"arch": arch, "layout": label, "rates": spec.to_hrank_string(), "macs": counts.macs,
                   "params": counts.params,
                   "recal": {s: evaluate(model, evals[s])["top1"] for s in evals}}
            if args.epochs:
                recipe = recipes.apply_overrides(recipes.get_preset("fast"), {
                    "epochs": args.epochs, "lr": 0.02, "lr_ref_batch": 0, "warmup_epochs": min(0.5, args.epochs)},
                    "bench").validate()
                torch.manual_seed(args.seed)
                with tempfile.TemporaryDirectory() as tmp:
                    batches = make_train_batches(train, recipe, normalization=norm, device=cpu, seed=args.seed)
                    fit(model, batches, evals["val"], recipe, out_dir=tmp, progress=False, printer=lambda s: None,
                        tensorboard=False)
                row["finetuned"] = {s: evaluate(model, evals[s])["top1"] for s in evals}
            row["seconds"] = time.perf_counter() - t0
            reference = reference or row
            delta = {s: row["recal"][s] - reference["recal"][s] for s in evals}
            line = (f"| {label} | {row['macs'] / 1e6:.2f}M | {row['params'] / 1e6:.3f}M | "
                    f"{row['recal']['val']:.2f} ({delta['val']:+.2f}) | {row['recal']['test']:.2f} "
                    f"({delta['test']:+.2f}) |")
            if args.epochs:
                d = {s: row["finetuned"][s] - reference["finetuned"][s] for s in evals}
                line += (f" {row['finetuned']['val']:.2f} ({d['val']:+.2f}) | {row['finetuned']['test']:.2f} "
                         f"({d['test']:+.2f}) |")
            print(line, flush=True)
            rows.append(row)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
