"""Rank generation speed: hrank.ranks.compute_ranks against a faithful re-implementation of official HRank.

Both run in this one process on the same images and the script prints:

* official: one forward pass over all batches *per hooked point* (55 for ResNet-56, 49 for ResNet-50,
  whose block-0 downsample conv shares conv3's post-add map) and, in the hook, a Python loop calling
  ``torch.linalg.matrix_rank(map).item()`` per (image, channel), running float32 mean (HRank's
  rank_generation.py, rewritten);
* hrank: ``compute_ranks`` (one pass per batch, every point hooked, exact batched ranks on all cores),
  timed on the same prepared batches (and end to end from the uint8 ImageSet when no resize is needed);
* floor: one forward pass per batch plus batched ``matrix_rank`` (SVD) of all maps on all cores
  (``compute_ranks(method="svd")``), and the bare forward passes;
* the fraction of maps whose rank is identical, per-conv max |mean-rank difference|, whether the kept
  filters for HRank's compress_rate of the model are the same (exact ties excepted), and peak extra
  memory (also of the bare forward passes, which a large batch's activations dominate).

The official side can run on a subset (``--official-images K``, the first K of the same images): on 2
cores it costs 20-40 s per 224x224 ResNet-50 image (49 forward passes). Its ratio is then taken against
hrank on the same K images, timed right before and right after it (alternating), and also per image
against hrank on all images.

Models: any registry name (``--model``, default resnet_56). Weights: ``--checkpoint`` (default: the
pretrained ResNet-56 of shared/data/weights for resnet_56, else none); without one the model is random
(seeded) with randomized BN affine parameters and running stats calibrated on the bench images -- fine
for timing and for comparing the two methods, meaningless as filter scores. Images: CIFAR-10 training
images (shared/data/cifar10, augmented as HRank did), bilinearly upscaled to ``--size`` (default: the
model's input size), or random normal images with ``--random-images`` or when no CIFAR-10 is found.

Usage: python bench/rank_speed.py [--model resnet_50 --size 224 --images 64 --official-images 8]
       [--device cuda] [--skip-official] [--json out.json]
Results and conditions are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hrank import models
from hrank.data import ImageSet, Normalization, load_cifar
from hrank.ranks import _act_fn, _imageset_batches, compute_ranks, matrix_ranks
from hrank.spec import parse_rates

# shared/ next to the checkout (device machine), one level up (this machine's layout), or /work/shared
SHARED_CANDIDATES = [Path("shared"), Path("../shared"), Path(__file__).resolve().parents[2] / "shared",
                     Path("/work/shared")]
SHARED = next((p for p in SHARED_CANDIDATES if (p / "data").is_dir()), Path("/work/shared"))
# HRank README strings (entry i prunes a fraction of the convs of models.rate_entries(arch)[i])
HRANK_RATES = {
    "resnet_56": "[0.1]+[0.60]*35+[0.0]*2+[0.6]*6+[0.4]*3+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]+[0.1]+[0.4]",
    "resnet_110": "[0.1]+[0.40]*36+[0.40]*36+[0.4]*36",
    "resnet_50": "[0.2]+[0.8]*10+[0.8]*13+[0.55]*19+[0.45]*10",
    "vgg_16_bn": "[0.95]+[0.5]*6+[0.9]*4+[0.8]*2",
    "densenet_40": "[0.0]+[0.1]*6+[0.7]*6+[0.0]+[0.1]*6+[0.7]*6+[0.0]+[0.1]*6+[0.7]*5+[0.0]",
    "googlenet": "[0.10]+[0.8]*5+[0.85]+[0.8]*3",
}
RESNET56_RATE = parse_rates(HRANK_RATES["resnet_56"])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak extra memory while the block runs: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss()
            self.stop = threading.Event()
            self.high = self.base

            def sample() -> None:
                while not self.stop.wait(0.002):
                    self.high = max(self.high, self._rss())

            self.thread = threading.Thread(target=sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.stop.set()
            self.thread.join()
            self.peak = max(self.high, self._rss()) - self.base


def official_ranks(model: nn.Module, batches: list[torch.Tensor], points: dict, device: torch.device
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HRank's algorithm: per hooked point, a full pass over the data with one hook and a per-map rank loop.

    Convs that share a point (ResNet-50's block-0 downsample and conv3) share its pass and its ranks, as
    in the official code. Returns the float32 running means (as the official .npy files) and the per-map
    ranks for comparison.
    """
    groups: dict[tuple, list[str]] = {}
    for conv, point in points.items():
        if point.call is not None:
            raise SystemExit(f"official re-implementation: rank point of {conv} has call={point.call}; unsupported")
        groups.setdefault((point.module, point.channels, point.act), []).append(conv)
    means: dict[str, np.ndarray] = {}
    per_map: dict[str, np.ndarray] = {}
    model.eval()
    for (module, channels, act), convs in groups.items():
        state = {"result": torch.tensor(0.0), "total": torch.tensor(0.0), "maps": []}
        act_fn = _act_fn(act) if act else None

        def hook(m, inputs, output, channels=channels, act_fn=act_fn, state=state):
            if channels:
                output = output[:, channels[0]:channels[1]]
            if act_fn is not None:
                output = act_fn(output)
            a, b = output.shape[0], output.shape[1]
            c = torch.tensor([torch.linalg.matrix_rank(output[i, j, :, :]).item()
                              for i in range(a) for j in range(b)])
            state["maps"].append(c.numpy().astype(np.int64))
            c = c.view(a, -1).float().sum(0)
            state["result"] = state["result"] * state["total"] + c
            state["total"] = state["total"] + a
            state["result"] = state["result"] / state["total"]

        handle = model.get_submodule(module).register_forward_hook(hook)
        with torch.no_grad():
            for x in batches:
                model(x)
        handle.remove()
        sync(device)
        for conv in convs:
            means[conv] = state["result"].numpy()
            per_map[conv] = np.concatenate(state["maps"])
    return means, per_map


def hrank_per_map(model: nn.Module, batches: list[torch.Tensor], points: dict) -> dict[str, np.ndarray]:
    """Per-map ranks from hrank's exact fast path on the same hooked maps (for the agreement count)."""
    out: dict[str, list[np.ndarray]] = {c: [] for c in points}
    handles = []
    for conv, point in points.items():
        act_fn = _act_fn(point.act) if point.act else None

        def hook(module, inputs, output, conv=conv, point=point, act_fn=act_fn):
            if point.channels:
                output = output[:, point.channels[0]:point.channels[1]]
            if act_fn is not None:
                output = act_fn(output)
            out[conv].append(matrix_ranks(output).cpu().numpy().reshape(-1))
        handles.append(model.get_submodule(point.module).register_forward_hook(hook))
    with torch.no_grad():
        for x in batches:
            model(x)
    for h in handles:
        h.remove()
    return {c: np.concatenate(v) for c, v in out.items()}


def kept(scores: np.ndarray, rate: float) -> set[int]:
    """HRank's selection: drop the int(rate*C) lowest-ranked filters."""
    return set(np.argsort(scores, kind="stable")[int(rate * len(scores)):].tolist())


def conv_rates(model: nn.Module, arch: str) -> tuple[dict[str, float], str]:
    """Rate per conv for the kept-set comparison: HRank's README string for the arch, else 0.5 everywhere."""
    entries = models.rate_entries(model)
    text = HRANK_RATES.get(arch) or f"[0.5]*{len(entries)}"
    rates = parse_rates(text)
    if len(rates) != len(entries):
        raise SystemExit(f"{arch}: rate string has {len(rates)} entries, the model {len(entries)}")
    return {conv: r for entry, r in zip(entries, rates, strict=True) for conv in entry}, text


def compare_kept(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], counts: dict[str, np.ndarray] | None,
                 rates: dict[str, float]) -> tuple[int, int, list[str]]:
    """(identical, equal up to exact ties, differing convs) for the given per-conv rates.

    A kept set that differs from the reference one is still correct when it keeps a top set under the
    reference's integer rank counts, i.e. it only swaps filters whose counts tie at the boundary
    (``counts`` None: the reference scores themselves are compared).
    """
    identical, ties, differ = 0, 0, []
    for conv, rate in rates.items():
        if conv not in ours or conv not in ref:
            continue
        a, b = kept(ours[conv], rate), kept(ref[conv], rate)
        if a == b:
            identical += 1
            continue
        cnt = counts[conv] if counts is not None else ref[conv]
        rest = [i for i in range(len(cnt)) if i not in a]
        if not rest or min(cnt[list(a)]) >= max(cnt[rest]):
            ties += 1
        else:
            differ.append(conv)
    return identical, ties, differ


def max_mean_diff(ours: dict[str, np.ndarray], ref: dict[str, np.ndarray], convs: list[str]) -> tuple[float, str]:
    """Largest |mean rank difference| over every filter of every conv, and the conv where it occurs."""
    diffs = {c: float(np.max(np.abs(ours[c] - ref[c]))) for c in convs}
    worst = max(diffs, key=diffs.get)
    return diffs[worst], worst


def randomize(model: nn.Module, calib: torch.Tensor, seed: int) -> None:
    """Random BN affine parameters, then running stats calibrated on ``calib`` (a stand-in for training).

    gamma ~ U(0.5, 1.5), beta ~ N(-0.2, 0.4^2): post-ReLU maps of varied sparsity, hence varied ranks.
    """
    g = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            if bn.affine:
                bn.weight.copy_(torch.rand(bn.weight.shape, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.bias.shape, generator=g) * 0.4 - 0.2)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
        model.train()
        for x in calib.split(16):
            model(x)
        model.eval()
    for bn in bns:
        bn.momentum = 0.1


def split_images(batches: list[torch.Tensor], k: int, batch_size: int) -> list[torch.Tensor]:
    """The first k images of ``batches``, re-cut into batches of ``batch_size``."""
    return list(torch.cat(batches)[:k].split(batch_size))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CPU_SECONDS: dict[str, float] = {}


def timed(fn, device: torch.device, name: str):
    """Wall seconds of fn(); its CPU seconds (all threads of this process) go to CPU_SECONDS[name].

    On a shared machine wall time depends on the other load; CPU time much less so.
    """
    sync(device)
    t, c = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    CPU_SECONDS[name] = time.process_time() - c
    return out, time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet_56", help=f"registry name ({', '.join(models.names())})")
    p.add_argument("--checkpoint", default=None,
                   help="weights (default: shared/data/weights/resnet56-*.th for resnet_56, else none); "
                        "'none': random weights with randomized BN")
    p.add_argument("--data-dir", default=str(SHARED / "data/cifar10"))
    p.add_argument("--random-images", action="store_true", help="random normal images instead of CIFAR-10")
    p.add_argument("--size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--images", "--num-images", dest="num_images", type=int, default=500)
    p.add_argument("--official-images", type=int, default=None,
                   help="run the official method on the first K images only (default: all)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--normalization", default="imagenet", help="the checkpoint was trained with ImageNet stats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-official", action="store_true", help="only hrank and the floor (quick check)")
    p.add_argument("--skip-floor", action="store_true", help="no batched-SVD floor run")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda":
        # Every side in full float32: hrank ranks without TF32 (docs/ranks.md), and the official code ran on
        # V100s, which have no TF32; with TF32 convolutions the maps themselves differ, and so do their ranks.
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    load_before = os.getloadavg()
    torch.manual_seed(args.seed)
    spec = models.get_spec(args.model)
    model = models.create(args.model)
    checkpoint = args.checkpoint
    if checkpoint is None and args.model == "resnet_56":
        default = SHARED / "data/weights/resnet56-4bfd9763.th"
        checkpoint = str(default) if default.is_file() else None
    if checkpoint in ("none", ""):
        checkpoint = None
    size = args.size or spec.input_size[-1]
    n = args.num_images
    k = min(args.official_images or n, n)
    bs = min(args.batch_size, n)

    data: ImageSet | None = None
    norm = Normalization.get(args.normalization)
    if not args.random_images and (Path(args.data_dir) / "cifar-10-batches-py").is_dir():
        data = load_cifar(args.data_dir, "cifar10", "train", download=False)
        gen, _ = _imageset_batches(data, n, bs, seed=args.seed, augment=True, norm=norm, device=device,
                                   rank=0, world=1)
        batches = list(gen)  # the same augmented images for every method
        if batches[0].shape[-1] != size:
            batches = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) for x in batches]
        source = f"CIFAR-10 training images (augmented, seed {args.seed}" + \
            (f", bilinearly upscaled 32->{size})" if size != 32 else ")")
    else:
        g = torch.Generator().manual_seed(args.seed)
        batches = list(torch.randn(n, spec.input_size[0], size, size, generator=g).to(device).split(bs))
        source = f"random normal {size}x{size} images (seed {args.seed})"
    if checkpoint:
        models.load_checkpoint(model, checkpoint)
        weights = f"weights {Path(checkpoint).name}"
    else:
        randomize(model, torch.cat(batches)[:min(n, 64)].cpu(), args.seed)
        weights = "random weights, randomized BN (timing and agreement only: not meaningful scores)"
    model.to(device).eval()
    points = models.rank_points(model)
    convs = models.prunable_convs(model)
    rates, rate_text = conv_rates(model, args.model)
    n_passes = len({(pt.module, pt.channels, pt.call, pt.act) for pt in points.values()})
    threads = torch.get_num_threads()
    print(f"{args.model} ({weights}), {size}x{size}, {n} {source}, batch {bs}, "
          f"{device.type}{f', {threads} threads' if device.type == 'cpu' else ''}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs ({cpu_model()}), load average before {load_before[0]:.2f}", flush=True)
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")

    # warm-up (LAPACK workspaces, allocator, thread pools) on two images
    compute_ranks(model, batches[0][:2], num_images=2, progress=False)
    compute_ranks(model, batches[0][:2], num_images=2, progress=False, method="svd")
    with torch.no_grad():
        model(batches[0])

    def fwd(bb):
        with torch.no_grad():
            for x in bb:
                model(x)

    results: dict = {"model": args.model, "size": size, "weights": weights, "images": source, "device": device.type,
                     "threads": threads, "cpus": os.cpu_count(), "cpu_model": cpu_model(), "num_images": n,
                     "batch_size": bs, "torch": torch.__version__, "load_before": load_before[0]}
    cpu = CPU_SECONDS
    with PeakMemory(device) as fmem:  # the forward pass's own activations, for comparison
        _, t_forward = timed(lambda: fwd(batches), device, "forward")
    with PeakMemory(device) as mem:
        ours, t_ours = timed(lambda: compute_ranks(model, batches, num_images=n, progress=False), device, "hrank")
    print(f"forward passes only          {t_forward:8.2f} s  (CPU {cpu['forward']:.2f} s)   "
          f"{t_forward / n * 1e3:.1f} ms/image, peak extra memory {fmem.peak / 2 ** 20:.0f} MiB")
    print(f"hrank (prepared batches)     {t_ours:8.2f} s  (CPU {cpu['hrank']:.2f} s)   "
          f"{t_ours / n * 1e3:.1f} ms/image, hrank / forward = {t_ours / t_forward:.2f}, "
          f"peak extra memory {mem.peak / 2 ** 20:.0f} MiB", flush=True)
    results.update({"forward_s": t_forward, "hrank_s": t_ours, "peak_extra_mb": mem.peak / 2 ** 20,
                    "forward_peak_extra_mb": fmem.peak / 2 ** 20})
    if data is not None and size == data.images.shape[-1]:
        _, t_e2e = timed(lambda: compute_ranks(model, data, num_images=n, batch_size=bs, device=device,
                                               normalization=norm, seed=args.seed, progress=False), device, "e2e")
        print(f"hrank (end to end, ImageSet) {t_e2e:8.2f} s  (CPU {cpu['e2e']:.2f} s)")
        results["hrank_end_to_end_s"] = t_e2e
    if not args.skip_floor:
        floor, t_floor = timed(lambda: compute_ranks(model, batches, num_images=n, progress=False, method="svd"),
                               device, "floor")
        print(f"floor (1 pass + batched SVD) {t_floor:8.2f} s  (CPU {cpu['floor']:.2f} s)   hrank / floor = "
              f"{t_ours / t_floor:.2f} (CPU {cpu['hrank'] / cpu['floor']:.2f})")
        # both are mean ranks over the same n images: n * difference counts maps whose rank differs
        floor_diff = int(round(sum(float(np.abs(ours.scores[c] - floor.scores[c]).sum()) for c in convs) * n))
        fi, ft, fd = compare_kept(ours.scores, floor.scores, None, rates)
        print(f"maps ranked differently from matrix_rank (floor): at most {floor_diff}; kept sets vs floor "
              f"({n} images): {fi} identical, {ft} equal up to exact ties, {len(fd)} differ"
              f"{': ' + ', '.join(fd) if fd else ''}")
        results.update({"floor_s": t_floor, "max_maps_differing_from_svd": floor_diff,
                        "floor_kept_identical": fi, "floor_kept_tie_equivalent": ft, "floor_kept_differ": fd})

    if not args.skip_official:
        sub = batches if k == n else split_images(batches, k, bs)
        print(f"official re-implementation ({n_passes} passes, per-map matrix_rank + .item()) on "
              f"{'all ' if k == n else 'the first '}{k} of the {n} images, alternating with hrank on them ...",
              flush=True)
        h1, t_h1 = timed(lambda: compute_ranks(model, sub, num_images=k, progress=False), device, "hrank_sub1")
        (off_means, off_maps), t_official = timed(lambda: official_ranks(model, sub, points, device), device,
                                                  "official")
        _, t_h2 = timed(lambda: compute_ranks(model, sub, num_images=k, progress=False), device, "hrank_sub2")
        _, t_fsub = timed(lambda: fwd(sub), device, "forward_sub")
        t_hsub = (t_h1 + t_h2) / 2
        cpu_hsub = (cpu["hrank_sub1"] + cpu["hrank_sub2"]) / 2
        our_maps = hrank_per_map(model, sub, points)
        total = sum(len(off_maps[c]) for c in convs)
        same = sum(int((our_maps[c] == off_maps[c]).sum()) for c in convs)
        counts = {c: off_maps[c].reshape(k, -1).sum(0) for c in convs}
        ident, ties, differ = compare_kept(h1.scores, off_means, counts, rates)
        ratio = t_official / t_hsub
        per_image = (t_official / k) / (t_ours / n)
        print(f"official ({k} images)        {t_official:8.2f} s  (CPU {cpu['official']:.2f} s)   "
              f"{t_official / k * 1e3:.0f} ms/image")
        print(f"hrank, same {k} images       {t_h1:8.2f} s before, {t_h2:.2f} s after   "
              f"forward passes only {t_fsub:.2f} s")
        print(f"official / hrank             {ratio:.1f}x on the same {k} images "
              f"(CPU {cpu['official'] / cpu_hsub:.1f}x); per image vs hrank on all {n}: {per_image:.1f}x; "
              f"official / forward = {t_official / t_fsub:.1f}x")
        # the rank work alone: each side minus its forward passes (official: one pass per point)
        off_rank, our_rank = t_official - n_passes * t_fsub, t_hsub - t_fsub
        if our_rank > 0 and off_rank > 0:
            print(f"rank work alone (minus forward passes): official ~{off_rank:.2f} s, hrank ~{our_rank:.2f} s, "
                  f"~{off_rank / our_rank:.1f}x")
            results["rank_work_speedup"] = off_rank / our_rank
        if "hrank_end_to_end_s" in results and k == n:
            print(f"official / hrank end to end  {t_official / results['hrank_end_to_end_s']:.1f}x")
        print(f"identical map ranks          {same}/{total} = {same / total:.6%}")
        print(f"kept sets ({args.model} rate)  {ident} identical, {ties} equal up to exact ties, "
              f"{len(differ)} differ{': ' + ', '.join(differ) if differ else ''}   rate {rate_text}")
        md, worst = max_mean_diff(h1.scores, off_means, convs)
        print(f"max |mean rank difference|   {md:.2e} ({worst})")
        results.update({"official_images": k, "official_s": t_official, "official_passes": n_passes,
                        "hrank_same_images_s": [t_h1, t_h2], "forward_same_images_s": t_fsub,
                        "speedup": ratio, "speedup_per_image_vs_all": per_image,
                        "official_over_forward": t_official / t_fsub,
                        "maps": total, "identical_maps": same, "identical_fraction": same / total,
                        "kept_identical": ident, "kept_tie_equivalent": ties, "kept_differ": differ,
                        "kept_convs": len(rates), "rate": rate_text, "max_mean_diff": md, "max_mean_diff_conv": worst})
        if "hrank_end_to_end_s" in results and k == n:
            results["speedup_end_to_end"] = t_official / results["hrank_end_to_end_s"]
    results["cpu_seconds"] = dict(CPU_SECONDS)
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        results["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    results["load_after"] = os.getloadavg()[0]
    print(f"process peak RSS {results['max_rss_mb']:.0f} MiB; load average after {results['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
