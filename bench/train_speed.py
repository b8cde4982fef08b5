"""Training throughput of ResNet-56 on CIFAR-10-shaped data: hrank's device-side ``Batches`` vs a plain
``DataLoader`` with per-sample transforms, same model, batch and optimizer, measured in one process.

What is measured (images/s, median of ``--repeats`` timed windows after warm-up):
  data path alone   iterate batches and move them to the device (no model)
  training          data + forward + backward + SGD step

The DataLoader pipeline is what a torchvision user writes (RandomCrop(32, padding=4), RandomHorizontalFlip,
ToTensor, Normalize) done per sample in ``Dataset.__getitem__``, written out here because torchvision is
optional; ``--workers`` sets its worker processes. Data is random uint8 (content does not change the cost)
unless ``--data-dir`` points at CIFAR-10.

    python bench/train_speed.py                       # CPU here; CUDA when present
    python bench/train_speed.py --workers 0 2 4 --batch 128 --steps 10
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hrank import models
from hrank.data import Batches, ImageSet, Normalization, load_cifar


class PerSampleCifar(Dataset):
    """CIFAR as a map-style dataset with per-sample crop (pad 4), flip and normalize: the usual pipeline."""

    def __init__(self, images_hwc: np.ndarray, labels: np.ndarray, norm: Normalization, seed: int = 0) -> None:
        self.images = images_hwc  # (N, 32, 32, 3) uint8, as PIL-based pipelines hold them
        self.labels = labels
        self.mean = np.asarray(norm.mean, dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(norm.std, dtype=np.float32).reshape(3, 1, 1)
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        rng = np.random.default_rng((self.seed, i, torch.initial_seed() % (1 << 32)))
        img = np.pad(self.images[i], ((4, 4), (4, 4), (0, 0)))  # RandomCrop(32, padding=4)
        y, x = rng.integers(0, 9, size=2)
        img = img[y:y + 32, x:x + 32]
        if rng.random() < 0.5:  # RandomHorizontalFlip
            img = img[:, ::-1]
        t = img.transpose(2, 0, 1).astype(np.float32) / 255.0  # ToTensor
        t = (t - self.mean) / self.std  # Normalize
        return torch.from_numpy(np.ascontiguousarray(t)), int(self.labels[i])


def _data(args) -> ImageSet:
    if args.data_dir:
        return load_cifar(args.data_dir, "cifar10", "train", download=False)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    return ImageSet(images, labels, [str(i) for i in range(10)], "random")


def _endless(make_iter):
    while True:
        yield from make_iter()


def _time(step, n_warmup: int, n_steps: int, repeats: int, batch: int, device: torch.device) -> float:
    """Median images/s over ``repeats`` windows of ``n_steps`` calls of ``step`` (after ``n_warmup``)."""
    for _ in range(n_warmup):
        step()
    rates = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n_steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(n_steps * batch / (time.perf_counter() - t0))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed training steps per window")
    p.add_argument("--data-steps", type=int, default=50, help="timed batches per window, data path alone")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to try")
    p.add_argument("--images", type=int, default=10000, help="random images when --data-dir is not given")
    p.add_argument("--data-dir", default=None, help="real CIFAR-10 (folder holding cifar-10-batches-py)")
    p.add_argument("--model", default="resnet_56")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    norm = Normalization.get("cifar")
    data = _data(args)
    print(f"{args.model}, batch {args.batch}, {len(data)} images ({data.name}), device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"python {platform.python_version()}, load average {os.getloadavg()[0]:.2f}")

    torch.manual_seed(0)
    model = models.create(args.model).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def train_step(x, y):
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    pipelines = {}
    batches = Batches(data, args.batch, normalization=norm, train=True, device=device, seed=0)
    hr_iter = _endless(lambda: iter(batches))
    pipelines["hrank Batches (device-side)"] = lambda: next(hr_iter)
    hwc = data.images.permute(0, 2, 3, 1).contiguous().numpy()
    ds = PerSampleCifar(hwc, data.labels.numpy(), norm)
    loaders = {}
    for w in args.workers:
        dl = DataLoader(ds, batch_size=args.batch, shuffle=True, drop_last=True, num_workers=w,
                        pin_memory=device.type == "cuda", persistent_workers=w > 0,
                        generator=torch.Generator().manual_seed(0))
        it = _endless(lambda dl=dl: iter(dl))
        loaders[w] = it

        def fetch(it=it):
            x, y = next(it)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        pipelines[f"DataLoader per-sample, {w} workers"] = fetch

    rows = []
    for name, fetch in pipelines.items():
        data_rate = _time(lambda fetch=fetch: fetch(), args.warmup, args.data_steps, args.repeats, args.batch, device)
        train_rate = _time(lambda fetch=fetch: train_step(*fetch()), args.warmup, args.steps, args.repeats,
                           args.batch, device)
        rows.append((name, data_rate, train_rate))
        print(f"  {name:<36} data path {data_rate:10.0f} img/s   training {train_rate:8.1f} img/s", flush=True)
    base = rows[0]
    for name, d, t in rows[1:]:
        print(f"hrank vs {name}: data path {base[1] / d:.1f}x, training {base[2] / t:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
