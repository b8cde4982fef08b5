"""Inference latency of ResNet-56: dense vs physically pruned at about half the MACs vs mask mode, in one process.

The pruned network removes channels for real (``hrank.prune.apply_plan``, physical mode), so its forward
pass does less work; mask mode (HRank's way) keeps every shape and only zeroes filters, so it cannot be
faster, and the table says so. Each row reports MACs, the median latency of ``--repeats`` timed runs after
``--warmup`` runs, and the speed-up beside the MAC reduction. Goal on CPU at batch 128: speed-up >= 80% of
the MAC reduction.
The three models are timed interleaved (one run of each per round, eval mode, ``inference_mode``, CUDA
synchronised), so a load change on a shared machine hits all three alike; the median over rounds is shown.

By default the pruned model uses one uniform rate on every conv (residual streams included), the largest
that keeps at least ``--target`` of the dense MACs; ``--compress-rate`` uses an HRank string instead (e.g.
the official one, about 27% of the MACs with the mean width rule). Weights are random unless
``--checkpoint`` is given: latency does not depend on their values. Filter scores are seeded random (which
channels survive does not change the cost).

    python bench/latency.py                           # CPU batch 1 and 128; CUDA too when present
    python bench/latency.py --batches 1 32 128 --repeats 20 --threads 2
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

from hrank import flops, models
from hrank.plan import make_plan
from hrank.prune import apply_plan
from hrank.spec import Spec

ARCH = "resnet_56"
INPUT = (3, 32, 32)


def random_scores(model: nn.Module, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def uniform_plan(model: nn.Module, target: float):
    """The plan with the largest uniform rate (step 0.01) whose physical MACs stay >= target * dense MACs."""
    dense = flops.count(model, INPUT).macs
    scores = random_scores(model)
    groups = None
    best = None
    for step in range(0, 100):
        rate = step / 100
        spec = Spec.from_string(model, f"[{rate}]*{len(models.rate_entries(model))}")
        plan = make_plan(model, scores, spec, criterion="random", groups=groups)
        macs = flops.count(apply_plan(copy.deepcopy(model), plan), INPUT).macs
        if macs < target * dense:
            break
        best = (plan, rate)
    return best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_latency(named: dict[str, nn.Module], batch: int, device: str, warmup: int,
                        repeats: int, channels_last: bool = False) -> dict[str, list[float]]:
    """Milliseconds per forward for each model, timed round-robin (one run of each model per round)."""
    x = torch.randn(batch, *INPUT, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in named}
    with torch.inference_mode():
        for model in named.values():
            for _ in range(warmup):
                model(x)
        _sync(device)
        for _ in range(repeats):
            for name, model in named.items():
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1000.0)
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5, help="fraction of dense MACs to keep (default 0.5)")
    ap.add_argument("--compress-rate", default=None, help="HRank string instead of a uniform rate")
    ap.add_argument("--checkpoint", default=None, help="ResNet-56 weights (default: random)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128], help="batch sizes (default 1 128)")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (default 15)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format for weights and input")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = models.create(ARCH).eval()
    if args.checkpoint:
        models.load_checkpoint(dense, args.checkpoint)
    if args.compress_rate:
        spec = Spec.from_string(dense, args.compress_rate)
        plan = make_plan(dense, random_scores(dense), spec, criterion="random")
        label = "HRank string"
    else:
        plan, rate = uniform_plan(dense, args.target)
        label = f"uniform rate {rate:.2f}"
    pruned = apply_plan(copy.deepcopy(dense), plan).eval()
    masked = apply_plan(copy.deepcopy(dense), plan, mode="mask").eval()
    macs = {name: flops.count(m, INPUT).macs for name, m in (("dense", dense), ("physical", pruned),
                                                             ("mask", masked))}
    macs["mask"] = macs["dense"]  # a masked model runs every multiply; its zeros are still computed
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    print(f"# {ARCH} latency: dense vs pruned ({label}: {flops.format_count(macs['physical'])} of "
          f"{flops.format_count(macs['dense'])} MACs) vs mask mode")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, python {sys.version.split()[0]}; median of {args.repeats} runs "
          f"after {args.warmup} warm-up{', channels_last' if args.channels_last else ''}")
    header = f"{'device':6} {'batch':>5} {'model':9} {'MACs':>8} {'MAC red.':>8} {'median ms':>10} " \
             f"{'p10-p90 ms':>15} {'speed-up':>8} {'of MAC red.':>11}"
    print(header)
    print("-" * len(header))
    named = {"dense": dense, "physical": pruned, "mask": masked}
    for device in devices:
        for m in named.values():
            m.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
        for batch in args.batches:
            times = interleaved_latency(named, batch, device, args.warmup, args.repeats, args.channels_last)
            base = statistics.median(times["dense"])
            for name, ts in times.items():
                median = statistics.median(ts)
                q = statistics.quantiles(ts, n=10, method="inclusive") if len(ts) >= 2 else [median] * 9
                reduction = macs["dense"] / macs[name]
                speedup = base / median
                print(f"{device:6} {batch:>5} {name:9} {flops.format_count(macs[name]):>8} {reduction:>7.2f}x "
                      f"{median:>10.2f} {q[0]:>7.2f}-{q[-1]:<7.2f} {speedup:>7.2f}x "
                      f"{100 * speedup / reduction:>10.0f}%")
        for m in named.values():
            m.to("cpu")
    print("# 'of MAC red.' = measured speed-up / MAC reduction; goal on CPU at batch 128: >= 80% for 'physical'.")
    print("# mask mode computes the full network (zeros included): no speed-up is expected, and none is measured.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
