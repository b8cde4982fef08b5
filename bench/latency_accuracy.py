"""Latency budget vs MAC budget at equal measured latency: which pruned ResNet-56 is more accurate?

Issue 15's accuracy goal. For each runtime asked (``--runtimes``), on this machine at ``--batch``:

1. ``hrank.latency.find_latency_budget`` finds widths for ``--target`` x the dense model's latency (HRank scores
   of the pretrained ResNet-56 on 500 training images decide which filters go);
2. the MAC-budget model of the same measured latency is found by bisection on the MAC target of
   ``hrank.budget.find_budget`` (the library's default widths), each candidate timed against the dense model;
3. the three models (dense, latency-budget, MAC-budget) are timed side by side, deployed (BatchNorm folded);
4. both pruned models are BN-recalibrated (512 training images) and fine-tuned with the same short recipe
   (``fast`` schedule, ``--epochs`` on ``--train-subset`` images, lr 0.02 at batch 128); top-1 on validation
   after recalibration, and on the 10k JPEG-derived test set and the 1,000 exact-pixel images after fine-tuning.

Timing runs first for every runtime (the machine should be quiet), fine-tuning after. One JSON per runtime in
``--out``; a finished runtime is skipped on a rerun.

    python bench/latency_accuracy.py --runtimes torchscript onnxruntime --threads 2 --out runs/latacc
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import torch

from hrank import flops, models, recipes
from hrank.budget import find_budget
from hrank.data import Batches, Normalization, load_batch_files, load_cifar
from hrank.errors import HRankError
from hrank.io import atomic_write_json
from hrank.latency import LatencySetup, compare_end_to_end, deployed, find_latency_budget, make_runtime
from hrank.plan import make_plan
from hrank.prune import apply_plan, recalibrate_bn
from hrank.ranks import compute_scores
from hrank.spec import Spec
from hrank.train import evaluate, fit, make_eval_batches, make_train_batches, split_train_val


def equal_latency_mac_model(base: torch.nn.Module, scores, ratio: float, runtime, dense_run, x: torch.Tensor,
                            steps: int, say) -> tuple[float, float, object]:
    """Bisection on the MAC target: the default-width MAC-budget model whose measured latency ratio is closest to
    ``ratio``. Returns (MAC target, measured ratio, spec)."""
    lo, hi = 0.02, 0.95
    best = None
    for _ in range(steps):
        t = (lo + hi) / 2
        try:
            spec = find_budget(base, scores, target=t).spec
        except HRankError:  # below the smallest reachable count
            lo = t
            continue
        model = apply_plan(copy.deepcopy(base), make_plan(base, scores, spec))
        run = runtime.prepare(deployed(model, x[:1]), x)
        got = compare_end_to_end({"dense": dense_run, "mac": run}, runtime)
        r = got["mac"] / got["dense"]
        say(f"  MAC target {t:.3f}: {r:.1%} of the dense latency")
        if best is None or abs(r - ratio) < abs(best[1] - ratio):
            best = (t, r, spec)
        if r > ratio:
            hi = t
        else:
            lo = t
    assert best is not None
    return best


def _counts(model: torch.nn.Module) -> dict[str, int]:
    c = flops.count(model)
    return {"macs": c.macs, "params": c.params}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data/cifar10")
    ap.add_argument("--checkpoint", default="../shared/data/weights/resnet56-4bfd9763.th")
    ap.add_argument("--runtimes", nargs="+", default=["torchscript", "onnxruntime"],
                    choices=["torch", "torchscript", "onnxruntime"])
    ap.add_argument("--target", type=float, default=0.5, help="latency target, fraction of the dense latency")
    ap.add_argument("--batch", type=int, default=1, help="batch size the latency is measured at")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bisect-steps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=15, help="alternating rounds of the final side-by-side timing")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-subset", type=int, default=10000)
    ap.add_argument("--val-images", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default=None, help="per-layer latency tables (default: $HRANK_CACHE or ~/.cache/hrank)")
    ap.add_argument("--out", default="runs/latency_accuracy")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    norm = Normalization.get("imagenet")
    base = models.create("resnet_56")
    models.load_checkpoint(base, args.checkpoint)
    base.eval()
    train_all = load_cifar(args.data_dir, "cifar10", "train", download=False)
    train, val = split_train_val(train_all, 5000, seed=args.seed)
    scores = compute_scores(base, train, ("hrank",), num_images=500, seed=args.seed, normalization=norm,
                            progress=False)["hrank"]
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} "
               f"threads, torch {torch.__version__}")
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    # -- phase 1: timing (quiet machine) ----------------------------------------------------------------------
    found: dict[str, dict] = {}
    for name in args.runtimes:
        path = out / f"{name}-b{args.batch}.json"
        if path.exists():
            found[name] = json.loads(path.read_text())
            continue
        setup = LatencySetup(runtime=name, batch_size=args.batch, threads=args.threads)
        runtime = make_runtime(setup)
        print(f"{name}: latency target {args.target:.0%} at batch {args.batch}", flush=True)
        t0 = time.perf_counter()
        try:
            lat = find_latency_budget(base, scores, target=args.target, setup=setup, cache_dir=args.cache,
                                      progress=lambda s: print("  " + s, flush=True))
        except HRankError as e:
            print(f"  refused: {e}", flush=True)
            atomic_write_json(path, {"runtime": name, "batch": args.batch, "refused": str(e), "machine": machine})
            found[name] = json.loads(path.read_text())
            continue
        search_s = time.perf_counter() - t0
        dense_run = runtime.prepare(deployed(base, x[:1]), x)
        mac_target, mac_ratio, mac_spec = equal_latency_mac_model(
            base, scores, lat.measured, runtime, dense_run, x, args.bisect_steps, lambda s: print(s, flush=True))
        lat_model = apply_plan(copy.deepcopy(base), make_plan(base, scores, lat.spec))
        mac_model = apply_plan(copy.deepcopy(base), make_plan(base, scores, mac_spec))
        runs = {"dense": dense_run, "latency": runtime.prepare(deployed(lat_model, x[:1]), x),
                "mac": runtime.prepare(deployed(mac_model, x[:1]), x)}
        side = compare_end_to_end(runs, runtime, rounds=args.rounds)
        row = {"runtime": name, "batch": args.batch, "threads": torch.get_num_threads(), "machine": machine,
               "target": args.target, "search_seconds": search_s, "search_measured_ratio": lat.measured,
               "side_by_side_ms": side, "dense_macs": flops.count(base).macs,
               "latency_model": {"spec": lat.hrank_string(), "macs": lat.macs, "params": lat.params,
                                 "ratio": side["latency"] / side["dense"]},
               "mac_model": {"mac_target": mac_target, "bisection_ratio": mac_ratio,
                             "spec": mac_spec.to_hrank_string(), **_counts(mac_model),
                             "ratio": side["mac"] / side["dense"]}}
        print(f"  side by side: dense {side['dense']:.3f} ms, latency-budget {side['latency']:.3f} ms "
              f"({row['latency_model']['ratio']:.1%}, {row['latency_model']['macs'] / row['dense_macs']:.1%} MACs), "
              f"MAC-budget {side['mac']:.3f} ms ({row['mac_model']['ratio']:.1%}, "
              f"{row['mac_model']['macs'] / row['dense_macs']:.1%} MACs)", flush=True)
        atomic_write_json(path, row)
        found[name] = row

    # -- phase 2: accuracy after recalibration and after the same short fine-tune ------------------------------
    test = load_cifar(args.data_dir, "cifar10", "test", download=False)
    lossless = load_batch_files([Path(args.data_dir) / "lossless_subset" / "test_batch_first1000"], 10,
                                name="lossless-1k")
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.train_subset]
    ft_train = train.subset(pick.sort().values)
    val = val.subset(torch.arange(min(args.val_images, len(val))))
    device = torch.device("cpu")
    evals = {n: make_eval_batches(d, normalization=norm, device=device)
             for n, d in (("val", val), ("test", test), ("lossless", lossless))}
    recipe = recipes.apply_overrides(recipes.get_preset("fast"), {
        "epochs": args.epochs, "batch_size": 128, "lr": 0.02, "lr_ref_batch": 0,
        "warmup_epochs": min(0.5, float(args.epochs))}, "latency-accuracy").validate()
    for name, row in found.items():
        if "refused" in row:
            continue
        for kind in ("latency_model", "mac_model"):
            if "after_finetune" in row[kind]:
                continue
            spec = Spec.from_string(base, row[kind]["spec"])
            model = apply_plan(copy.deepcopy(base), make_plan(base, scores, spec))
            recalibrate_bn(model, Batches(train, 128, normalization=norm, train=True, device=device,
                                          seed=args.seed + 2), 512)
            row[kind]["after_recalibration"] = {"val": evaluate(model, evals["val"])["top1"]}
            torch.manual_seed(args.seed)
            t0 = time.perf_counter()
            result = fit(model, make_train_batches(ft_train, recipe, normalization=norm, device=device,
                                                   seed=args.seed),
                         evals["val"], recipe, out_dir=out / f"{name}-{kind}", overwrite=True, progress=False,
                         printer=lambda s: None, tensorboard=False)
            row[kind]["after_finetune"] = {"val": result.val["top1"],
                                           **{s: evaluate(model, evals[s])["top1"] for s in ("test", "lossless")}}
            row[kind]["finetune_seconds"] = time.perf_counter() - t0
            atomic_write_json(out / f"{name}-b{args.batch}.json", row)
            print(f"{name} {kind}: after recal. {row[kind]['after_recalibration']}, after fine-tune "
                  f"{row[kind]['after_finetune']}", flush=True)
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
