"""Inference latency of ResNet-56: dense vs physically pruned at about half the MACs vs mask mode, in one process.

The pruned network removes channels for real (``hrank.prune.apply_plan``, physical mode), so its forward
pass does less work; mask mode (HRank's way) keeps every shape and only zeroes filters, so it cannot be
faster, and the table says so. Each row reports MACs, the median latency of ``--repeats`` timed runs after
``--warmup`` runs, and the speed-up beside the MAC reduction. Goal on CPU at batch 128: speed-up >= 80% of
the MAC reduction.
The three models are timed interleaved (one run of each per round, eval mode, ``inference_mode``, CUDA
synchronised), so a load change on a shared machine hits all three alike; the median over rounds is shown.

By default the pruned model's rates come from ``hrank.budget.find_budget`` (keeping ``--target`` of the dense
MACs, in the library's default order unless ``--budget-order`` says otherwise); ``--compress-rate`` uses an HRank
string instead (e.g. the official one, about 27% of the MACs with the mean width rule). Weights are random unless
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
import sys
import tempfile
import time

import numpy as np
import torch

from hrank import flops, models
from hrank.budget import find_budget
from hrank.criteria import random_scores
from hrank.errors import HRankError
from hrank.plan import make_plan
from hrank.profile import compare_latency, summarise_latency
from hrank.prune import apply_plan
from hrank.spec import Spec

ARCH = "resnet_56"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", type=float, default=0.5, help="fraction of dense MACs to keep (default 0.5)")
    ap.add_argument("--compress-rate", default=None, help="HRank string instead of a budget search")
    ap.add_argument("--budget-order", default=None, help="hrank.budget order (default: the library's)")
    ap.add_argument("--round-to", type=int, default=None,
                    help="width multiple of the budget search (default: the library's; 1 = exact channels)")
    ap.add_argument("--model", default=ARCH, help="registry name or external reference, e.g. "
                    "torchvision:mobilenet_v2 (default %(default)s)")
    ap.add_argument("--input-size", type=int, default=None, help="image side (default: 32, or 224 for external models)")
    ap.add_argument("--checkpoint", default=None, help="weights of --model (default: random)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 128], help="batch sizes (default 1 128)")
    ap.add_argument("--repeats", type=int, default=15, help="timed runs per measurement (default 15)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed runs first (default 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if present)")
    ap.add_argument("--onnxruntime", action="store_true",
                    help="also time dense and pruned exported to ONNX, run by onnxruntime on the CPU (hrank[export])")
    ap.add_argument("--target-latency", type=float, default=None,
                    help="also time a model pruned to this fraction of the dense latency (hrank.latency), searched "
                         "on --latency-runtime at --latency-batch")
    ap.add_argument("--latency-runtime", default="torch", choices=("torch", "torchscript", "onnxruntime"))
    ap.add_argument("--latency-batch", type=int, default=1)
    ap.add_argument("--torchscript", action="store_true",
                    help="also time the models traced and frozen to TorchScript (channels_last)")
    ap.add_argument("--fold-bn", action="store_true",
                    help="also time dense and pruned with BatchNorm folded into the convs (hrank.fold)")
    ap.add_argument("--layouts", nargs="+", choices=("nchw", "channels_last"), default=["nchw", "channels_last"],
                    help="memory formats to time, each for all three models (default: both)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    side = args.input_size or (224 if ":" in args.model else 32)
    INPUT = (3, side, side)
    dense = models.create(args.model).eval()
    if args.checkpoint:
        models.load_checkpoint(dense, args.checkpoint)
    scores = random_scores(dense)  # which channels survive does not change the cost
    if args.compress_rate:
        spec = Spec.from_string(dense, args.compress_rate)
        label = "HRank string"
    else:
        extra = {"order": args.budget_order} if args.budget_order else {}
        if args.round_to is not None:
            extra["round_to"] = args.round_to
        result = find_budget(dense, scores, target=args.target, input_size=INPUT, **extra)
        spec = result.spec
        label = (f"rates found for {args.target:.0%} of the MACs, order {args.budget_order or 'default'}, "
                 f"widths in multiples of {result.round_to}")
    plan = make_plan(dense, scores, spec, criterion="random")
    pruned = apply_plan(copy.deepcopy(dense), plan).eval()
    masked = apply_plan(copy.deepcopy(dense), plan, mode="mask").eval()
    macs = {name: flops.count(m, INPUT).macs for name, m in (("dense", dense), ("physical", pruned),
                                                             ("mask", masked))}
    macs["mask"] = macs["dense"]  # a masked model runs every multiply; its zeros are still computed
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])

    print(f"# {args.model} at {side}x{side} latency: dense vs pruned ({label}: "
          f"{flops.format_count(macs['physical'])} of "
          f"{flops.format_count(macs['dense'])} MACs) vs mask mode")
    print(f"# torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} threads, python {sys.version.split()[0]}; median of {args.repeats} runs "
          f"after {args.warmup} warm-up")
    header = f"{'device':6} {'layout':13} {'batch':>5} {'model':10} {'MACs':>8} {'MAC red.':>8} {'median ms':>10} " \
             f"{'p10-p90 ms':>15} {'speed-up':>8} {'of MAC red.':>11}"
    print(header)
    print("-" * len(header))
    named = {"dense": dense, "physical": pruned, "mask": masked}
    if args.target_latency is not None:
        from hrank.latency import LatencySetup, find_latency_budget

        setup = LatencySetup(runtime=args.latency_runtime, batch_size=args.latency_batch, threads=args.threads,
                             layout="channels_last" if "channels_last" in args.layouts else "nchw")
        t0 = time.perf_counter()
        try:
            found = find_latency_budget(dense, scores, target=args.target_latency, setup=setup, input_size=INPUT)
        except HRankError as e:
            print(f"hrank: error: {e}", file=sys.stderr)
            return 2
        lat_model = apply_plan(copy.deepcopy(dense), make_plan(dense, scores, found.spec, criterion="random")).eval()
        named["lat-budget"] = lat_model
        macs["lat-budget"] = flops.count(lat_model, INPUT).macs
        print(f"# lat-budget: {found.describe()}; searched in {time.perf_counter() - t0:.0f} s "
              f"({found.table_measured} layer timings, {found.rounds} rounds)")
    if args.fold_bn:
        from hrank.fold import fold_batchnorm

        example = torch.zeros(1, *INPUT)
        named.update({"dense+fold": fold_batchnorm(dense, example).model,
                      "phys+fold": fold_batchnorm(pruned, example).model})
        macs.update({"dense+fold": macs["dense"], "phys+fold": macs["physical"]})
        if "lat-budget" in named:  # the search measured it folded: time it that way too
            named["lat+fold"] = fold_batchnorm(named["lat-budget"], example).model
            macs["lat+fold"] = macs["lat-budget"]
    for device, layout in [(d, lay) for d in devices for lay in args.layouts]:
        channels_last = layout == "channels_last"
        for m in named.values():
            m.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for batch in args.batches:
            # interleaved rounds: a load change on a shared machine hits all three models alike
            lat = compare_latency(named, INPUT, batch, device=device, rounds=args.repeats, repeats=1,
                                  warmup=args.warmup, channels_last=channels_last)
            for name, stats in lat.items():
                _row(device, layout, batch, name, macs, stats.median_ms, stats.p10_ms, stats.p90_ms,
                     lat["dense"].median_ms)
        for m in named.values():
            m.to("cpu", memory_format=torch.contiguous_format)
    if args.torchscript:
        _torchscript_rows(named, INPUT, macs, args)
    if args.onnxruntime:
        exported = {"dense": dense, "physical": pruned}
        if "lat-budget" in named:
            exported["lat-budget"] = named["lat-budget"]
        sessions = _onnxruntime_sessions(exported, INPUT)  # dynamic batch axis: export once
        for batch in args.batches:
            lat = {name: summarise_latency(samples, batch, "cpu")
                   for name, samples in _onnxruntime_times(sessions, batch, INPUT, args).items()}
            for name, stats in lat.items():
                _row("cpu", "onnxruntime", batch, name, macs, stats.median_ms, stats.p10_ms, stats.p90_ms,
                     lat["dense"].median_ms)
    print("# 'of MAC red.' = measured speed-up / MAC reduction; goal on CPU at batch 128: >= 80% for 'physical'.")
    print("# channels_last is the layout for CPU inference: in NCHW oneDNN reorders every activation around each "
          "conv,\n# memory traffic that does not shrink with the MACs (docs/benchmarks.md).")
    if args.fold_bn:
        print("# +fold: BatchNorm folded into the conv before it (hrank.fold; what TorchScript export saves).")
    print("# mask mode computes the full network (zeros included): no speed-up is expected, and none is measured.")
    return 0


def _row(device: str, layout: str, batch: int, name: str, macs: dict[str, int], median: float, p10: float,
         p90: float, base: float) -> None:
    reduction = macs["dense"] / macs[name]
    speedup = base / median
    print(f"{device:6} {layout:13} {batch:>5} {name:10} {flops.format_count(macs[name]):>8} {reduction:>7.2f}x "
          f"{median:>10.2f} {p10:>7.2f}-{p90:<7.2f} {speedup:>7.2f}x {100 * speedup / reduction:>10.0f}%")


def _torchscript_rows(named: dict[str, torch.nn.Module], input_size: tuple[int, ...], macs: dict[str, int],
                      args: argparse.Namespace) -> None:
    """Each model traced and frozen (BatchNorm folded by the freeze, as ``hrank export`` saves it), channels_last,
    timed in alternation through the ``torchscript`` latency runtime."""
    from hrank.latency import LatencySetup, make_runtime

    for batch in args.batches:
        runtime = make_runtime(LatencySetup(runtime="torchscript", batch_size=batch, threads=args.threads))
        x = torch.randn(batch, *input_size, generator=torch.Generator().manual_seed(0))
        runs = {name: runtime.prepare(copy.deepcopy(m).cpu(), x) for name, m in named.items()
                if name in ("dense", "physical", "lat-budget")}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                times[name] += runtime.times(run, 1, args.warmup)
        lat = {name: summarise_latency(t, batch, "cpu") for name, t in times.items()}
        for name, stats in lat.items():
            _row("cpu", "torchscript", batch, name, macs, stats.median_ms, stats.p10_ms, stats.p90_ms,
                 lat["dense"].median_ms)


def _onnxruntime_sessions(named: dict[str, torch.nn.Module], input_size: tuple[int, ...]) -> dict:
    """Each model exported to ONNX (checked against PyTorch) and opened as an onnxruntime CPU session."""
    import onnxruntime as ort

    from hrank.export import export_onnx
    from hrank.latency import ort_timing_options

    options = ort_timing_options()  # idle workers stop spinning, so sessions timed in alternation do not collide
    sessions = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in named.items():
            path = os.path.join(tmp, f"{name}.onnx")
            export_onnx(model, path, input_size)
            sessions[name] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return sessions


def _onnxruntime_times(sessions: dict, batch: int, input_size: tuple[int, ...], args: argparse.Namespace
                       ) -> dict[str, list[float]]:
    """Milliseconds per run of each session, timed in alternation as compare_latency does for PyTorch."""
    x = np.random.default_rng(0).standard_normal((batch, *input_size), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(args.repeats):
        for name, sess in sessions.items():
            for _ in range(args.warmup):
                sess.run(None, {"input": x})
            start = time.perf_counter()
            sess.run(None, {"input": x})
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


if __name__ == "__main__":
    sys.exit(main())
