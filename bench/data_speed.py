"""Throughput of the image-folder pipeline (hrank.imagefolder): images/s through the DataLoader.

Training: decode + RandomResizedCrop + flip -> uint8 (3, S, S); evaluation: decode + Resize + CenterCrop.
Both go through ``FolderBatches.loader()`` (the workers' whole job); "+norm" adds what the main process does
(``FolderBatches`` iteration: normalization to float on the CPU). Without ``--root`` a folder of ~1000 JPEGs of
256-400 px is written to a temporary directory (CIFAR-10 images upscaled, when a copy is found, else smooth
noise), like ImageNet's typical 400 x 350 JPEGs but smaller.

    python bench/data_speed.py [--root DIR] [--images 1000] [--workers 0 2 4] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CIFAR = [os.environ.get("HRANK_CIFAR10", ""), "/work/shared/data/cifar10", "data"]


def _cifar_images(n: int) -> tuple[np.ndarray, np.ndarray] | None:
    from hrank.data import load_batch_pickle

    for cand in CIFAR:
        f = Path(cand) / "cifar-10-batches-py" / "data_batch_1" if cand else None
        if f is not None and f.exists():
            b = load_batch_pickle(f)
            data = np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            return data[:n], np.asarray(b[b"labels"])[:n]
    return None


def make_jpeg_folder(root: Path, n: int, seed: int = 0) -> Path:
    """``n`` training JPEGs (quality 90, 256-400 px per side) in 10 class folders, plus 10 per class in val/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    real = _cifar_images(n + 100)
    for i in range(n + 100):
        split = "train" if i < n else "val"
        if real is not None:
            img, label = Image.fromarray(real[0][i]), int(real[1][i])
        else:
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            img, label = Image.fromarray(small), i % 10
        w, h = (int(v) for v in rng.integers(256, 401, 2))
        folder = root / split / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        img.resize((w, h), Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def measure(batches, passes: int, raw: bool) -> tuple[float, float]:
    """(images/s of the first pass, which may start the workers; best images/s of the later passes)."""
    rates = []
    for p in range(passes):
        batches.set_epoch(p)
        t0, seen = time.perf_counter(), 0
        for x, _ in (batches.loader() if raw else batches):
            seen += x.shape[0]
        rates.append(seen / (time.perf_counter() - t0))
    return rates[0], max(rates[1:] or rates)


def decoders(split, n: int = 200) -> str:
    """images/s of decode + RandomResizedCrop + flip in this process: torchvision.io (what hrank uses) vs PIL."""
    from PIL import Image
    from torchvision.transforms.v2.functional import pil_to_tensor

    from hrank.imagefolder import _decode, _Images

    items = _Images(split)
    paths = [split.path(i) for i in range(min(n, len(split)))]

    def pil(p: str) -> torch.Tensor:
        with Image.open(p) as im:
            return pil_to_tensor(im.convert("RGB"))

    out, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (more intra-op threads only contend on small images)
    try:
        for name, fn in (("torchvision.io", _decode), ("PIL", pil)):
            fn(paths[0])
            t0 = time.perf_counter()
            for k, p in enumerate(paths):
                items.transform(fn(p), k)
            out.append(f"{name} {len(paths) / (time.perf_counter() - t0):.0f} img/s")
    finally:
        torch.set_num_threads(threads)
    return ", ".join(out)


def environment() -> str:
    import torchvision

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = "?"
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, hrank {commit}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="an image folder (ROOT/train/<class>/...); default: write ~1000 JPEGs")
    ap.add_argument("--images", type=int, default=1000, help="training images to write (without --root)")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--resize-size", type=int, default=256)
    ap.add_argument("--passes", type=int, default=2, help="passes per setting (the first includes worker start)")
    args = ap.parse_args()

    from hrank.imagefolder import FolderBatches, FolderSplit

    tmp = None
    if args.root:
        root = Path(args.root)
    else:
        tmp = Path(tempfile.mkdtemp(prefix="hrank-data-speed-"))
        t0 = time.perf_counter()
        root = make_jpeg_folder(tmp, args.images)
        print(f"wrote {args.images} + 100 JPEGs to {tmp} in {time.perf_counter() - t0:.1f} s")
    try:
        split = FolderSplit.from_folder(root / "train", image_size=args.image_size, resize_size=args.resize_size)
        sizes = [os.path.getsize(split.path(i)) for i in range(len(split))]
        print(f"{len(split)} images, {split.num_classes} classes, mean file {np.mean(sizes) / 1024:.0f} KiB\n")
        print("| pipeline | workers | first pass img/s | steady img/s | +norm img/s |")
        print("|---|---:|---:|---:|---:|")
        for train in (True, False):
            for w in args.workers:
                def make(w: int = w, train: bool = train) -> FolderBatches:
                    return FolderBatches(split, args.batch_size, normalization="imagenet", train=train, seed=0,
                                         workers=w)
                batches = make()
                first, steady = measure(batches, args.passes, raw=True)
                _, full = measure(batches, 1, raw=False)  # workers already running
                batches.close()
                name = "train (RandomResizedCrop+flip)" if train else "eval (Resize+CenterCrop)"
                print(f"| {name} | {w} | {first:.0f} | {steady:.0f} | {full:.0f} |", flush=True)
        print(f"\ndecode + training transform, one process, one thread, {min(200, len(split))} images: "
              f"{decoders(split)}")
        print(f"\n{environment()}, load average {' '.join(f'{v:.1f}' for v in os.getloadavg())}")
        print("command: " + " ".join([Path(sys.executable).name, *sys.argv]))
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
