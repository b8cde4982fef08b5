"""Width layouts of equal MACs, compared on what MACs do not show: parameters, training speed and latency.

ResNet-56's convs cost the same MACs in every stage (channels double as the side halves), so half the MACs
can be removed mostly from stage 1 (cheap in parameters, heavy in activations) or evenly. Each layout (an
HRank rate string) prunes the same model physically (seeded random scores: which channels survive does not
change the cost); the table gives MACs, parameters, training images/s (forward + backward + SGD step on a
random batch, the layouts timed in alternation in one process) and inference latency (``hrank.profile``,
also in alternation), each with its ratio to the first layout.

    python bench/width_layout.py --threads 1
    python bench/width_layout.py --layouts "[0.0, 0.5]*18+[0.0, 0.63]+[0.0, 0.5]*8+[0.0]" \\
        "[0.0]+[0.75,0.0]*9+[0.5,0.0]*9+[0.25,0.0]*9" --batch 128 --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

from hrank import flops, models
from hrank.criteria import random_scores
from hrank.plan import make_plan
from hrank.profile import compare_latency
from hrank.prune import apply_plan
from hrank.spec import Spec

LAYOUTS = ("[0.0, 0.5]*18+[0.0, 0.63]+[0.0, 0.5]*8+[0.0]",  # the default 50%-MAC budget: every inner conv
           "[0.0]+[0.75,0.0]*9+[0.5,0.0]*9+[0.25,0.0]*9")    # stage-wise: 0.75 / 0.5 / 0.25 of the inner convs


def train_rates(named: dict[str, nn.Module], batch: int, steps: int, rounds: int) -> dict[str, float]:
    """Training images/s of each model: ``rounds`` windows of ``steps`` SGD steps, alternating models; median."""
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    opts = {name: torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) for name, m in named.items()}
    loss_fn = nn.CrossEntropyLoss()

    def window(name: str, n: int) -> float:
        model, opt = named[name], opts[name]
        model.train()
        t = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
        return time.perf_counter() - t

    for name in named:
        window(name, 2)  # warm-up: allocator and kernels
    samples: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(rounds):
        for name in named:
            samples[name].append(steps * batch / window(name, steps))
    return {name: statistics.median(v) for name, v in samples.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), help="HRank rate strings (the first is the "
                    "reference of the ratios)")
    ap.add_argument("--model", default="resnet_56")
    ap.add_argument("--batch", type=int, default=128, help="training batch (default 128)")
    ap.add_argument("--steps", type=int, default=10, help="SGD steps per timed window (default 10)")
    ap.add_argument("--rounds", type=int, default=5, help="timed windows per layout (default 5)")
    ap.add_argument("--latency-batches", type=int, nargs="+", default=[1, 128])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = models.create(args.model).eval()
    scores = random_scores(dense)
    named: dict[str, nn.Module] = {}
    for i, rates in enumerate(args.layouts):
        spec = Spec.from_string(dense, rates)
        named[f"L{i}"] = apply_plan(copy.deepcopy(dense), make_plan(dense, scores, spec, criterion="random"))
    base = flops.count(dense)
    counts = {name: flops.count(m) for name, m in named.items()}
    print(f"# {args.model}: width layouts; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} threads, python {sys.version.split()[0]}")
    for i, rates in enumerate(args.layouts):
        c = counts[f"L{i}"]
        print(f"# L{i}: {rates}: {flops.format_count(c.macs)} MACs ({c.macs / base.macs:.1%}), "
              f"{c.params / 1e6:.3f}M params ({c.params / base.params:.1%})")
    rates = train_rates(named, args.batch, args.steps, args.rounds)
    ref = "L0"
    print(f"{'layout':6} {'what':28} {'value':>10} {'ratio to L0':>11}")
    for name in named:
        print(f"{name:6} {f'training img/s, batch {args.batch}':28} {rates[name]:10.1f} "
              f"{rates[name] / rates[ref]:11.2f}")
    for b in args.latency_batches:
        lat = compare_latency({n: m.eval() for n, m in named.items()}, (3, 32, 32), b, device="cpu", rounds=5,
                              repeats=5, warmup=2)
        for name in named:
            print(f"{name:6} {f'eval ms, batch {b}':28} {lat[name].median_ms:10.2f} "
                  f"{lat[name].median_ms / lat[ref].median_ms:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
