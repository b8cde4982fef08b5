"""``hrank rank``: score every filter by its mean feature-map rank (HRank) and write ranks.npz.

Also imports an official HRank ``rank_conv/<arch>`` folder into the same file format (``--official``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hrank import datasets, models, pipeline
from hrank.cli.common import NONNEG_INT, NUM_CLASSES, POSITIVE_INT, add_data_args, add_device_arg, format_table
from hrank.data import NORMALIZATIONS
from hrank.datasets import DataOptions
from hrank.distributed import DistInfo, init_distributed, process_group_scope
from hrank.errors import HRankError
from hrank.io import check_output, require_file
from hrank.ranks import METHODS, Ranks


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank", help="compute HRank filter scores (mean feature-map rank) and save them",
        description="Run the model once per batch over --num-images training images with hooks on every rank "
                    "point, compute every feature map's exact matrix rank, and save the mean per filter "
                    "(npz + JSON metadata). With --official, import an official HRank rank_conv folder instead.")
    p.add_argument("--model", required=True,
                   help=f"the model: a registry name ({', '.join(models.names())}), torchvision:NAME, timm:NAME or "
                        "package.module:factory")
    p.add_argument("--num-classes", type=NUM_CLASSES, default=None, help="classifier width (default: the arch's)")
    p.add_argument("--checkpoint", help="trained weights (.pt/.th state_dict); required unless --official")
    p.add_argument("--official", metavar="DIR", help="import an official HRank rank_conv/<arch> folder instead")
    p.add_argument("--out", required=True, help="output ranks file (.npz)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_data_args(p)
    p.add_argument("--num-images", type=POSITIVE_INT, default=500, help="images to average over (default %(default)s)")
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128, help="images per forward pass (default %(default)s)")
    p.add_argument("--normalization", choices=sorted(NORMALIZATIONS),
                   help="input mean/std (default: the checkpoint's, else the architecture's preset)")
    p.add_argument("--no-augment", action="store_true",
                   help="no random crop/flip (HRank ranked augmented training images)")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="seed of the image draw and augmentation (default 0)")
    p.add_argument("--method", choices=METHODS, default="gram",
                   help="gram: fast exact path (default); svd: torch.linalg.matrix_rank itself")
    add_device_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Under torchrun every process ranks a share of the images; rank 0 writes the one file."""
    out = check_output(args.out, force=args.force, what="output")  # written (atomically) only at the end
    started = time.perf_counter()
    if args.official:
        models.get_spec(args.model)
        ranks = Ranks.from_official(args.official, args.model)
        dist = DistInfo()
    else:
        dist, device = init_distributed(args.device)
        with process_group_scope():
            ranks = _compute(args, device, dist)
    if not dist.is_main:
        return 0
    ranks.save(out)
    print_summary(ranks)
    took = time.perf_counter() - started
    print(f"wrote {out} ({len(ranks.scores)} convs, {ranks.num_images} images, {ranks.meta.get('source')}"
          f"{f', {dist.world_size} processes' if dist.enabled else ''}, {took:.1f} s)")
    return 0


def _compute(args: argparse.Namespace, device: torch.device, dist: DistInfo) -> Ranks:
    if not args.checkpoint:
        raise HRankError("--checkpoint is required (ranks of untrained weights are meaningless), or use --official")
    require_file(args.checkpoint, "checkpoint")
    opts = DataOptions(root=args.data_dir, download=not args.no_download, val_size=0, seed=args.seed,
                       image_size=args.image_size, resize_size=args.resize_size, workers=args.workers)
    datasets.check(args.dataset, opts)  # before loading anything
    loaded = pipeline.load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes,
                                 normalization=args.normalization, dataset=args.dataset)
    data = pipeline.load_data(args.dataset, opts)
    pipeline.check_classes(loaded.model, data.num_classes, args.dataset)
    norm = loaded.normalization
    if dist.is_main:
        print(f"ranking {args.model} on {args.num_images} {args.dataset} training images "
              f"({'augmented' if not args.no_augment else 'no augmentation'}, {norm.name} normalization, seed "
              f"{args.seed}, {device.type}, {torch.get_num_threads() if device.type == 'cpu' else 1} thread(s)"
              f"{f', {dist.world_size} processes' if dist.enabled else ''})", flush=True)
    ranks = pipeline.score_filters(loaded.model, "hrank", data=data.train, num_images=args.num_images,
                                   batch_size=args.batch_size, augment=not args.no_augment, seed=args.seed,
                                   normalization=norm, device=device, method=args.method,
                                   progress=dist.is_main)
    ranks.meta["checkpoint"] = str(args.checkpoint)
    return ranks


def print_summary(ranks: Ranks) -> None:
    """Per conv: where it was scored, map size, filters, min / mean / max rank, filters of rank 0."""
    rows = []
    for conv, s in ranks.scores.items():
        p = ranks.points.get(conv)
        where = "" if p is None else p.module + (f"[{p.channels[0]}:{p.channels[1]}]" if p.channels else "") \
            + (f"#{p.call}" if p.call is not None else "")
        hw = ranks.spatial.get(conv)
        rows.append([conv, where, f"{hw[0]}x{hw[1]}" if hw else "?", len(s), f"{np.min(s):.2f}",
                     f"{np.mean(s):.2f}", f"{np.max(s):.2f}", int(np.sum(s == 0))])
    print(format_table(["conv", "point", "map", "filters", "min", "mean", "max", "rank 0"], rows,
                       align="lllrrrrr"))
    unranked = ranks.meta.get("unranked") or {}
    for conv, why in unranked.items():
        print(f"not ranked: {conv}: {why}")
