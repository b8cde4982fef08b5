"""CHIP score speed: hrank's exact fast path against a faithful re-implementation of the official CHIP code.

Official (Eclipsess/CHIP_NeurIPS2021, calculate_feature_maps.py + calculate_ci.py, rewritten to run in memory):
one full forward pass over the images *per hooked layer*; then per image and per channel, a copy of the
image's C x HW float32 maps with that row zeroed and ``torch.linalg.matrix_norm(..., ord="nuc").item()``, plus
the image's own nuclear norm; scores = mean over images of the differences. Generous to the official side: it
copies one image's matrix per channel (the official code clones the whole batch), keeps the maps in memory
(no .npy files) and skips their rounding to 4 decimals. hrank: ``compute_scores(..., ("chip",))`` -- one pass per
batch, every point hooked, one eigendecomposition per image and layer, all cores.

Both run in this process on the same images, alternating (hrank before and after the official run). Prints
times, the ratio, the max relative score difference and whether the kept sets at HRank's ResNet-56 rate are
identical. ``--official-images K`` runs the official side on the first K images only (and hrank on the same K
for the ratio). ``--model resnet_50 --size 224`` (random weights, randomized BN) gives the ResNet-50 figure.

Usage: python bench/chip_speed.py [--images 500 --official-images 50] [--model resnet_50 --size 224 --images 4]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rank_speed import SHARED, compare_kept, conv_rates, cpu_model, randomize  # noqa: E402

from hrank import models  # noqa: E402
from hrank.data import Normalization, load_cifar  # noqa: E402
from hrank.ranks import _act_fn, _imageset_batches, compute_scores  # noqa: E402


def official_chip(model, batches, points) -> dict[str, np.ndarray]:
    """One forward pass per hooked point; per (image, channel) a masked nuclear norm (float32, .item())."""
    groups: dict[tuple, list[str]] = {}
    for conv, p in points.items():
        groups.setdefault((p.module, p.channels, p.act), []).append(conv)
    out: dict[str, np.ndarray] = {}
    for (module, channels, act), convs in groups.items():
        act_fn = _act_fn(act) if act else None
        acc: list[np.ndarray] = []

        def hook(m, inputs, output, channels=channels, act_fn=act_fn, acc=acc):
            if channels:
                output = output[:, channels[0]:channels[1]]
            if act_fn is not None:
                output = act_fn(output)
            a = output.reshape(output.shape[0], output.shape[1], -1)
            ci = np.zeros((a.shape[0], a.shape[1]))
            for i in range(a.shape[0]):
                full = torch.linalg.matrix_norm(a[i], ord="nuc").item()
                for j in range(a.shape[1]):
                    masked = a[i].clone()
                    masked[j] = 0
                    ci[i, j] = full - torch.linalg.matrix_norm(masked, ord="nuc").item()
            acc.append(ci)

        handle = model.get_submodule(module).register_forward_hook(hook)
        with torch.no_grad():
            for x in batches:
                model(x)
        handle.remove()
        for conv in convs:
            out[conv] = np.concatenate(acc).mean(0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet_56")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--official-images", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--skip-official", action="store_true")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    spec = models.get_spec(args.model)
    model = models.create(args.model)
    size = args.size or spec.input_size[-1]
    n, bs = args.images, min(args.batch_size, args.images)
    k = min(args.official_images or n, n)
    data = load_cifar(SHARED / "data/cifar10", "cifar10", "train", download=False)
    gen, _ = _imageset_batches(data, n, bs, seed=0, augment=True, norm=Normalization.get("imagenet"),
                               device=torch.device("cpu"), rank=0, world=1)
    batches = list(gen)
    if size != 32:
        batches = [F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False) for x in batches]
    ckpt = SHARED / "data/weights/resnet56-4bfd9763.th"
    if args.model == "resnet_56" and ckpt.is_file():
        models.load_checkpoint(model, ckpt)
        weights = ckpt.name
    else:
        randomize(model, torch.cat(batches)[:min(n, 16)], 0)
        weights = "random weights, randomized BN"
    model.eval()
    points = models.rank_points(model)
    convs = models.prunable_convs(model)
    rates, rate_text = conv_rates(model, args.model)
    print(f"{args.model} ({weights}), {size}x{size}, {n} CIFAR-10 training images (augmented, seed 0), batch {bs}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({cpu_model()}), torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    compute_scores(model, batches[0][:2], ("chip",), num_images=2, progress=False)  # warm-up

    def ours(bb, m):
        t = time.perf_counter()
        r = compute_scores(model, bb, ("chip",), num_images=m, batch_size=bs, progress=False)["chip"]
        return r, time.perf_counter() - t

    both_t = time.perf_counter()
    compute_scores(model, batches, ("hrank", "chip"), num_images=n, batch_size=bs, progress=False)
    both_t = time.perf_counter() - both_t
    full, t_full = ours(batches, n)
    print(f"hrank chip, {n} images: {t_full:.2f} s ({t_full / n * 1e3:.1f} ms/image); hrank+chip in one pass "
          f"{both_t:.2f} s", flush=True)
    if args.skip_official:
        return 0
    sub = list(torch.cat(batches)[:k].split(bs))
    h1, t1 = ours(sub, k)
    t = time.perf_counter()
    off = official_chip(model, sub, points)
    t_off = time.perf_counter() - t
    _, t2 = ours(sub, k)
    th = (t1 + t2) / 2
    rel = max(float(np.max(np.abs(h1.scores[c] - off[c])) / max(np.max(np.abs(off[c])), 1e-30)) for c in convs)
    ident, ties, differ = compare_kept(h1.scores, off, None, rates)
    print(f"official, {k} images: {t_off:.2f} s ({t_off / k * 1e3:.0f} ms/image); hrank same {k} images "
          f"{t1:.2f} s before, {t2:.2f} s after")
    print(f"official / hrank: {t_off / th:.1f}x on the same {k} images; per image vs hrank on all {n}: "
          f"{(t_off / k) / (t_full / n):.1f}x")
    print(f"max relative score difference (per conv, vs its largest score): {rel:.2e}")
    print(f"kept sets ({rate_text}): {ident} identical, {ties} equal up to exact ties, {len(differ)} differ "
          f"{differ if differ else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
