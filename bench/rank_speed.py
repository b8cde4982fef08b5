"""Rank generation speed: hrank.ranks.compute_ranks against a faithful re-implementation of official HRank.

Both run in this one process on the same images (pretrained ResNet-56, CIFAR-10 training images drawn and
augmented once, batch 128) and the script prints:

* official: one forward pass over all batches *per hooked layer* (55 for ResNet-56) and, in the hook, a
  Python loop calling ``torch.linalg.matrix_rank(map).item()`` per (image, channel), running float32 mean
  (HRank's rank_generation.py, rewritten);
* hrank: ``compute_ranks`` (one pass per batch, every point hooked, exact batched ranks on all cores),
  timed on the same prepared batches and end to end from the uint8 ImageSet;
* floor: one forward pass per batch plus batched ``matrix_rank`` (SVD) of all maps on all cores
  (``compute_ranks(method="svd")``), and the bare forward passes;
* the fraction of maps whose rank is identical, whether the kept filters for HRank's ResNet-56
  compress_rate are the same (exact ties excepted), and peak extra memory at this batch size.

Usage: python bench/rank_speed.py [--device cuda] [--num-images 500] [--json out.json]
Results and conditions are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from hrank import models
from hrank.data import ImageSet, Normalization, load_cifar
from hrank.ranks import _imageset_batches, compute_ranks, matrix_ranks

SHARED = Path("/work/shared")
# HRank README, ResNet-56: entry i is the fraction pruned of prunable_convs('resnet_56')[i]
RESNET56_RATE = [0.1] + [0.60] * 35 + [0.0] * 2 + [0.6] * 6 + [0.4] * 3 + [0.1, 0.4] * 4


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


def official_ranks(model: torch.nn.Module, batches: list[torch.Tensor], points: dict, device: torch.device
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """HRank's algorithm: per layer, a full pass over the data with one hook and a per-map rank loop.

    Returns the float32 running means (as the official .npy files) and the per-map ranks for comparison.
    """
    means: dict[str, np.ndarray] = {}
    per_map: dict[str, np.ndarray] = {}
    model.eval()
    for conv, point in points.items():
        state = {"result": torch.tensor(0.0), "total": torch.tensor(0.0), "maps": []}

        def hook(module, inputs, output, point=point, state=state):
            if point.channels:
                output = output[:, point.channels[0]:point.channels[1]]
            a, b = output.shape[0], output.shape[1]
            c = torch.tensor([torch.linalg.matrix_rank(output[i, j, :, :]).item()
                              for i in range(a) for j in range(b)])
            state["maps"].append(c.numpy().astype(np.int64))
            c = c.view(a, -1).float().sum(0)
            state["result"] = state["result"] * state["total"] + c
            state["total"] = state["total"] + a
            state["result"] = state["result"] / state["total"]

        handle = model.get_submodule(point.module).register_forward_hook(hook)
        with torch.no_grad():
            for x in batches:
                model(x)
        handle.remove()
        sync(device)
        means[conv] = state["result"].numpy()
        per_map[conv] = np.concatenate(state["maps"])
    return means, per_map


def hrank_per_map(model: torch.nn.Module, batches: list[torch.Tensor], points: dict) -> dict[str, np.ndarray]:
    """Per-map ranks from hrank's exact fast path on the same hooked maps (for the agreement count)."""
    out: dict[str, list[np.ndarray]] = {c: [] for c in points}
    handles = []
    for conv, point in points.items():
        def hook(module, inputs, output, conv=conv, point=point):
            if point.channels:
                output = output[:, point.channels[0]:point.channels[1]]
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


def compare_kept(ours: dict[str, np.ndarray], official: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                 convs: list[str]) -> tuple[int, int, list[str]]:
    """(identical, equal up to exact ties, differing convs) for the ResNet-56 compress_rate.

    A kept set that differs from the official one is still correct when it keeps a top set under the
    official integer rank counts, i.e. it only swaps filters whose counts tie at the boundary.
    """
    identical, ties, differ = 0, 0, []
    for conv, rate in zip(convs, RESNET56_RATE, strict=True):
        a, b = kept(ours[conv], rate), kept(official[conv], rate)
        if a == b:
            identical += 1
            continue
        cnt = counts[conv]
        rest = [i for i in range(len(cnt)) if i not in a]
        if not rest or min(cnt[list(a)]) >= max(cnt[rest]):
            ties += 1
        else:
            differ.append(conv)
    return identical, ties, differ


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


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", default=str(SHARED / "data/weights/resnet56-4bfd9763.th"))
    p.add_argument("--data-dir", default=str(SHARED / "data/cifar10"))
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--normalization", default="imagenet", help="the checkpoint was trained with ImageNet stats")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-official", action="store_true", help="only hrank and the floor (quick check)")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()

    device = torch.device(args.device)
    load_before = os.getloadavg()
    model = models.create("resnet_56")
    models.load_checkpoint(model, args.checkpoint)
    model.to(device).eval()
    data: ImageSet = load_cifar(args.data_dir, "cifar10", "train", download=False)
    norm = Normalization.get(args.normalization)
    gen, _ = _imageset_batches(data, args.num_images, args.batch_size, seed=args.seed, augment=True, norm=norm,
                               device=device, rank=0, world=1)
    batches = list(gen)  # the same augmented images for every method
    points = models.rank_points(model)
    convs = models.prunable_convs(model)
    n = args.num_images
    print(f"ResNet-56, {n} CIFAR-10 training images (augmented, seed {args.seed}), batch {args.batch_size}, "
          f"{device.type}{'' if device.type != 'cpu' else f', {torch.get_num_threads()} threads'}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"load average before {load_before[0]:.2f}", flush=True)

    # warm-up (LAPACK workspaces, allocator, thread pools) on one small batch
    compute_ranks(model, [batches[0][:8]], num_images=8, progress=False)
    compute_ranks(model, [batches[0][:8]], num_images=8, progress=False, method="svd")

    def fwd():
        with torch.no_grad():
            for x in batches:
                model(x)

    _, t_forward = timed(fwd, device, "forward")
    with PeakMemory(device) as mem:
        ours, t_ours = timed(lambda: compute_ranks(model, batches, num_images=n, progress=False), device, "hrank")
    _, t_e2e = timed(lambda: compute_ranks(model, data, num_images=n, batch_size=args.batch_size, device=device,
                                           normalization=norm, seed=args.seed, progress=False), device, "e2e")
    floor, t_floor = timed(lambda: compute_ranks(model, batches, num_images=n, progress=False, method="svd"),
                           device, "floor")
    results: dict = {"device": device.type, "threads": torch.get_num_threads(), "num_images": n,
                     "batch_size": args.batch_size, "forward_s": t_forward, "hrank_s": t_ours,
                     "hrank_end_to_end_s": t_e2e, "floor_s": t_floor, "peak_extra_mb": mem.peak / 2 ** 20,
                     "torch": torch.__version__, "load_before": load_before[0]}
    cpu = CPU_SECONDS
    print(f"forward passes only          {t_forward:8.2f} s  (CPU {cpu['forward']:.2f} s)")
    print(f"hrank (prepared batches)     {t_ours:8.2f} s  (CPU {cpu['hrank']:.2f} s)   peak extra memory "
          f"{mem.peak / 2 ** 20:.0f} MiB")
    print(f"hrank (end to end, ImageSet) {t_e2e:8.2f} s  (CPU {cpu['e2e']:.2f} s)")
    print(f"floor (1 pass + batched SVD) {t_floor:8.2f} s  (CPU {cpu['floor']:.2f} s)   hrank / floor = "
          f"{t_ours / t_floor:.2f} (CPU {cpu['hrank'] / cpu['floor']:.2f})")
    # both are mean ranks over the same n images: n * difference counts maps whose rank differs
    floor_diff = int(round(sum(float(np.abs(ours.scores[c] - floor.scores[c]).sum()) for c in convs) * n))
    print(f"maps ranked differently from matrix_rank (floor): at most {floor_diff}")
    results["max_maps_differing_from_svd"] = floor_diff

    if not args.skip_official:
        print("official re-implementation (55 passes, per-map matrix_rank + .item()) ...", flush=True)
        (off_means, off_maps), t_official = timed(lambda: official_ranks(model, batches, points, device), device,
                                                  "official")
        our_maps = hrank_per_map(model, batches, points)
        total = sum(len(v) for v in off_maps.values())
        same = sum(int((our_maps[c] == off_maps[c]).sum()) for c in convs)
        counts = {c: off_maps[c].reshape(n, -1).sum(0) for c in convs}
        ident, ties, differ = compare_kept(ours.scores, off_means, counts, convs)
        ratio = t_official / t_ours
        print(f"official                     {t_official:8.2f} s  (CPU {cpu['official']:.2f} s)   official / hrank "
              f"= {ratio:.1f}x (end to end {t_official / t_e2e:.1f}x, CPU {cpu['official'] / cpu['hrank']:.1f}x)")
        print(f"identical map ranks          {same}/{total} = {same / total:.6%}")
        print(f"kept sets (ResNet-56 rate)   {ident} identical, {ties} equal up to exact ties, "
              f"{len(differ)} differ{': ' + ', '.join(differ) if differ else ''}")
        max_diff = max(float(np.max(np.abs(ours.scores[c] - off_means[c]))) for c in convs)
        print(f"max |mean rank difference|   {max_diff:.2e}")
        results.update({"official_s": t_official, "speedup": ratio, "speedup_end_to_end": t_official / t_e2e,
                        "maps": total, "identical_maps": same, "identical_fraction": same / total,
                        "kept_identical": ident, "kept_tie_equivalent": ties, "kept_differ": differ,
                        "max_mean_diff": max_diff})
    results["cpu_seconds"] = dict(CPU_SECONDS)
    results["load_after"] = os.getloadavg()[0]
    print(f"load average after {results['load_after']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
