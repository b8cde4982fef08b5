"""``hrank rank``: score every filter by its mean feature-map rank (HRank) and write ranks.npz.

Also imports an official HRank ``rank_conv/<arch>`` folder into the same file format (``--official``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from hrank import models
from hrank.cli.common import NONNEG_INT, POSITIVE_INT, add_data_args, add_device_arg, format_table, resolve_device
from hrank.data import NORMALIZATIONS, check_cifar, imagenet_loader, load_cifar
from hrank.errors import HRankError
from hrank.io import check_output, require_file
from hrank.ranks import METHODS, Ranks, compute_ranks
from hrank.validate import check_finite


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank", help="compute HRank filter scores (mean feature-map rank) and save them",
        description="Run the model once per batch over --num-images training images with hooks on every rank "
                    "point, compute every feature map's exact matrix rank, and save the mean per filter "
                    "(npz + JSON metadata). With --official, import an official HRank rank_conv folder instead.")
    p.add_argument("--model", required=True, help=f"architecture name ({', '.join(models.names())})")
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
    out = check_output(args.out, force=args.force, what="output")  # written (atomically) only at the end
    started = time.perf_counter()
    if args.official:
        models.get_spec(args.model)
        ranks = Ranks.from_official(args.official, args.model)
    else:
        ranks = _compute(args)
    ranks.save(out)
    print_summary(ranks)
    took = time.perf_counter() - started
    print(f"wrote {out} ({len(ranks.scores)} convs, {ranks.num_images} images, {ranks.meta.get('source')}, "
          f"{took:.1f} s)")
    return 0


def _compute(args: argparse.Namespace) -> Ranks:
    if not args.checkpoint:
        raise HRankError("--checkpoint is required (ranks of untrained weights are meaningless), or use --official")
    if args.num_images < 1:
        raise HRankError(f"--num-images must be >= 1, got {args.num_images}")
    spec = models.get_spec(args.model)
    device = resolve_device(args.device)
    require_file(args.checkpoint, "checkpoint")
    if args.dataset != "imagenet":
        if spec.dataset != "cifar":
            raise HRankError(f"{args.model} is an ImageNet model; use --dataset imagenet")
        check_cifar(args.data_dir, args.dataset, download=not args.no_download)  # before loading anything
    model = models.create(args.model)
    extra = models.load_checkpoint(model, args.checkpoint)
    check_finite(model, f"checkpoint {args.checkpoint}")
    norm = args.normalization or extra.get("normalization") or spec.normalization
    model.to(device)
    if args.dataset == "imagenet":
        data = imagenet_loader(args.data_dir, "train", args.batch_size, train=not args.no_augment,
                               normalization=norm, seed=args.seed)
    else:
        data = load_cifar(args.data_dir, args.dataset, "train", download=not args.no_download)
    name = norm if isinstance(norm, str) else norm.get("name", "custom")
    print(f"ranking {args.model} on {args.num_images} {args.dataset} training images "
          f"({'augmented' if not args.no_augment else 'no augmentation'}, {name} normalization, seed {args.seed}, "
          f"{device.type}, {torch.get_num_threads() if device.type == 'cpu' else 1} thread(s))", flush=True)
    ranks = compute_ranks(model, data, num_images=args.num_images, batch_size=args.batch_size, device=device,
                          augment=not args.no_augment, seed=args.seed, normalization=norm, method=args.method)
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
