"""``hrank info``: per-layer widths, MACs and params of a registered architecture."""

from __future__ import annotations

import argparse

from hrank import flops, models
from hrank.cli.common import format_table


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's layers, MACs and params",
                       description="Per-layer table (name, kind, output channels, MACs, params) and totals.")
    p.add_argument("--model", required=True, help=f"architecture name ({', '.join(models.names())})")
    p.add_argument("--num-classes", type=int, default=None, help="classifier width (default: the arch's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    spec = models.get_spec(args.model)
    model = models.create(args.model, num_classes=args.num_classes)
    print_model_table(model, spec.input_size, title=f"{args.model}: {spec.description}")
    return 0


def print_model_table(model, input_size, title: str = "") -> None:
    """Print the per-layer table and totals the way papers count (MACs of conv/linear, params w/o BN)."""
    c = flops.count(model, input_size)
    rows = [[layer.name, layer.kind, layer.out_channels, flops.format_count(layer.macs),
             flops.format_count(layer.params)] for layer in c.layers]
    if title:
        print(title)
    print(format_table(["layer", "kind", "out", "MACs", "params"], rows, align="llrrr"))
    print(f"total: {flops.format_count(c.macs)} MACs, {flops.format_count(c.params)} params "
          f"(conv+linear MACs, params without BN; input {'x'.join(map(str, input_size))})")
