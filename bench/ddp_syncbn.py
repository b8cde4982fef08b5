"""DDP with and without SyncBN against one process at the same global batch: drift of the weights, train
loss and the time per step (the cost of synchronising BatchNorm statistics).

For each global batch B it trains the same model from the same weights on the same images, in the same
order and with the same augmentation, for ``--steps`` steps with hrank's own trainer (``train._Trainer``):

  one      1 process, batch B (the reference; ``--threads`` threads)
  ddp      2 gloo processes (torchrun), B/2 each, sync_bn off: per-process BatchNorm statistics
  ddp+sync 2 gloo processes, B/2 each, sync_bn on (hrank.syncbn on CPU)

and reports, against ``one``: the relative L2 distance of all parameters ||w - w_one|| / ||w_one - w_0||
(the size of what training changed: 1 means as far from one process as one process moved) and
||w - w_one|| / ||w_one||, the largest relative difference of the BN running statistics; the same distance
to a float64 run of one process (``w64``: the float32 rounding error of each run, which is what "equal up
to float order" has to be measured against: a few SGD steps amplify float32 noise by orders of magnitude);
the mean train loss, and the median time per step (first step excluded; the fastest of ``--repeats``
interleaved runs). Each process uses ``--threads`` threads (default 1).

    python bench/ddp_syncbn.py --data-dir ../shared/data/cifar10 --weights ../shared/data/weights/resnet20-12fca82f.th
    python bench/ddp_syncbn.py --batches 32 128 --steps 20 --arch resnet_20
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch


def _worker(args: argparse.Namespace) -> None:
    """One training run (1 process, or one rank under torchrun): save final weights and step times."""
    from hrank import models, recipes, train
    from hrank.checkpoint import load_weights
    from hrank.data import load_cifar
    from hrank.distributed import shutdown_distributed

    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    dist, device = train.init_distributed("cpu")
    torch.manual_seed(0)
    model = models.create(args.arch)
    if args.weights:
        load_weights(model, args.weights)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtype = torch.float64 if args.float64 else torch.float32
    model.to(dtype)
    full = load_cifar(args.data_dir, "cifar10", "train", download=False)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    images = full.subset(order[:args.steps * args.batch])
    recipe = recipes.resolve("fast", overrides={"epochs": 1, "batch_size": args.batch, "lr": args.lr,
                                                "lr_ref_batch": 0, "schedule": "multistep", "milestones": [],
                                                "warmup_epochs": 0.0, "sync_bn": args.sync_bn})
    batches = train.make_train_batches(images, recipe, normalization=args.normalization, device=device, seed=0)
    trainer = train._Trainer(model, recipe, len(batches), device, dist)
    times: list[float] = []
    step_start = [time.perf_counter()]

    def timed(it):  # time from one batch request to the next = one full training step
        for x, y in it:
            yield x.to(dtype), y
            now = time.perf_counter()
            times.append(now - step_start[0])
            step_start[0] = now

    class _Timed:
        def __init__(self, b):
            self.b = b

        def __getattr__(self, name):
            return getattr(self.b, name)

        def __len__(self):
            return len(self.b)

        def __iter__(self):
            step_start[0] = time.perf_counter()
            return timed(iter(self.b))

    stats = trainer.train_epoch(_Timed(batches), 0, progress=False)
    if dist.is_main:
        torch.save({"w0": w0, "w": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                    "times": times, "train_loss": stats["train_loss"], "sync_bn": trainer.sync_bn},
                   Path(args.out) / "result.pt")
    shutdown_distributed()  # a barrier, then leave the group


def _launch(args: argparse.Namespace, batch: int, procs: int, sync_bn: str, out: Path, float64: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    common = [__file__, "--worker", "--data-dir", str(args.data_dir), "--arch", args.arch, "--batch", str(batch),
              "--steps", str(args.steps), "--lr", str(args.lr), "--sync-bn", sync_bn, "--out", str(out),
              "--normalization", args.normalization, "--threads", str(args.threads if procs == 1 else 1)]
    if args.weights:
        common += ["--weights", str(args.weights)]
    if float64:
        common += ["--float64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, *common] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"run failed ({' '.join(cmd)}):\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return torch.load(out / "result.pt")


def _compare(one: dict, other: dict, params: list[str]) -> dict:
    """Relative L2 distances of the parameters and the largest relative difference of BN running stats."""
    w0, w1, w2 = one["w0"], one["w"], other["w"]
    diff = sum(float(((w2[k].double() - w1[k].double()) ** 2).sum()) for k in params) ** 0.5
    moved = sum(float(((w1[k].double() - w0[k].double()) ** 2).sum()) for k in params) ** 0.5
    norm = sum(float((w1[k].double() ** 2).sum()) for k in params) ** 0.5
    running = [k for k in w1 if k.endswith(("running_mean", "running_var"))]
    bn = max((float((w2[k].double() - w1[k].double()).norm() / w1[k].double().norm().clamp_min(1e-12))
              for k in running), default=0.0)
    return {"rel_update": diff / max(moved, 1e-30), "rel_weights": diff / max(norm, 1e-30), "bn_rel": bn}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=os.environ.get("HRANK_CIFAR10", "../shared/data/cifar10"))
    ap.add_argument("--weights", default=None, help="pretrained checkpoint for --arch (else random init)")
    ap.add_argument("--arch", default="resnet_20")
    ap.add_argument("--normalization", default="imagenet", help="cifar or imagenet (akamaster's weights: imagenet)")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128], help="global batch sizes")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=1, help="threads of the 1-process runs")
    ap.add_argument("--repeats", type=int, default=2, help="DDP runs of each kind (timing: the fastest median)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=32, help=argparse.SUPPRESS)
    ap.add_argument("--sync-bn", default="off", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--float64", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.arch}{' pretrained' if args.weights else ''}, {args.steps} steps, lr {args.lr}, "
          f"{args.threads} thread(s) per process")
    print("| global batch | run | per process | vs one: ||w-w1||/||w1-w0|| | ||w-w1||/||w1|| | BN running stats "
          "(max rel) | vs float64: ||w-w64||/||w64-w0|| | train loss | s/step (median) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for batch in args.batches:
            exact = _launch(args, batch, 1, "off", Path(tmp) / f"exact{batch}", float64=True)
            one = _launch(args, batch, 1, "off", Path(tmp) / f"one{batch}")
            params = [k for k in one["w"] if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
            runs = {"one": [one]}
            for _ in range(args.repeats):  # interleaved, so that a busy moment of the machine hits both
                for name, sync in (("ddp", "off"), ("ddp+sync", "on")):
                    runs.setdefault(name, []).append(_launch(args, batch, 2, sync, Path(tmp) / f"{name}{batch}"))
            for name, results in runs.items():
                res, procs = results[0], 1 if name == "one" else 2
                cmp, ref = _compare(one, res, params), _compare(exact, res, params)
                step_s = min(statistics.median(r["times"][1:] or r["times"]) for r in results)
                row = {"batch": batch, "run": name, "per_process": batch // procs, **cmp,
                       "rel_update_vs_float64": ref["rel_update"], "train_loss": res["train_loss"],
                       "s_per_step": step_s, "sync_bn": res["sync_bn"]}
                rows.append(row)
                print(f"| {batch} | {name} | {batch // procs} | {cmp['rel_update']:.2e} | {cmp['rel_weights']:.2e} | "
                      f"{cmp['bn_rel']:.2e} | {ref['rel_update']:.2e} | {res['train_loss']:.4f} | {step_s:.3f} |",
                      flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
