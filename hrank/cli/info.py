"""``hrank info``: per-layer widths, MACs and params of a registered architecture or of a saved (pruned) model."""

from __future__ import annotations

import argparse
from pathlib import Path

from hrank import flops, models
from hrank.cli.common import NUM_CLASSES, format_table
from hrank.errors import HRankError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show a model's layers, MACs and params",
                       description="Per-layer table (name, kind, output channels, MACs, params, HRank rate "
                                   "entry) and totals, for an architecture name or for a model saved by hrank "
                                   "(a file, or a directory holding model.pt, e.g. the output of hrank prune).")
    p.add_argument("--model", default=None,
                   help=f"architecture name ({', '.join(models.names())}, torchvision:NAME, timm:NAME, "
                        f"module:factory), or a saved model file/directory")
    p.add_argument("--model-file", default=None,
                   help="a model saved by hrank (file, or a directory holding model.pt); give --model too when "
                        "it was built by your own code (module:factory): hrank runs only code you name")
    p.add_argument("--num-classes", type=NUM_CLASSES, default=None, help="classifier width (default: the arch's)")
    p.set_defaults(func=run)


def _saved_model_path(value: str) -> Path | None:
    path = Path(value)
    if path.is_dir():
        return path / "model.pt"
    if path.is_file():
        return path
    return None


def run(args: argparse.Namespace) -> int:
    if args.model_file is not None:
        path = _saved_model_path(args.model_file)
        if path is None:
            raise HRankError(f"model file not found: {args.model_file}")
        if args.model is not None:  # the user names the code that built the file
            models.trust(args.model)
        return _run_saved(path, args.model)
    if args.model is None:
        raise HRankError("no model: give --model (an architecture or a saved model) or --model-file")
    path = _saved_model_path(args.model) if args.model not in models.names() else None
    if path is not None:
        return _run_saved(path)
    spec = models.get_spec(args.model)
    model = models.create(args.model, num_classes=args.num_classes)
    entry_of = {conv: i + 1 for i, convs in enumerate(models.rate_entries(model)) for conv in convs}
    print_model_table(model, spec.input_size, title=f"{args.model}: {spec.description}", entry_of=entry_of)
    print(f"compress_rate entries: {len(models.rate_entries(model))} (column 'entry': the HRank rate entry of "
          f"each conv, in the order of the list syntax)")
    return 0


def _run_saved(path: Path, ref: str | None = None) -> int:
    from hrank.checkpoint import load
    from hrank.spec import Spec

    model, meta = load(path, arch=ref)  # a file of another model than --model: refused before building
    plan = meta["plan"]
    arch = meta["arch"]
    input_size = tuple(plan.input_size) if plan is not None else models.get_spec(arch).input_size
    norm = meta.get("normalization") or {}
    title = f"{path}: {arch}, mode {meta['mode'] or 'unpruned'}, normalization {norm.get('name', 'unknown')}"
    print_model_table(model, input_size, title=title, kept_of=plan.channels if plan is not None else None)
    if plan is not None and arch is not None:
        dense = models.create(arch, num_classes=meta.get("num_classes"))
        base = flops.count(dense, input_size)
        print(plan.summary())
        print(f"unpruned: {flops.format_count(base.macs)} MACs, {flops.format_count(base.params)} params")
        if plan.spec.get("rates") is not None:
            from hrank.prune import hrank_rule_counts

            counts = hrank_rule_counts(dense, Spec.from_json(plan.spec, dense), input_size)["as_pruned"]
            print(f"HRank's counting rule: {flops.format_count(counts.macs)} MACs, "
                  f"{flops.format_count(counts.params)} params")
    return 0


def print_model_table(model, input_size, title: str = "", entry_of: dict[str, int] | None = None,
                      kept_of: dict[str, int] | None = None) -> None:
    """Print the per-layer table and totals the way papers count (MACs of conv/linear, params w/o BN).

    ``entry_of`` adds the HRank rate entry of each conv; ``kept_of`` (a pruned model's unpruned widths) adds
    "kept/of" per conv. In mask mode the real widths are unchanged and the kept column tells what is used.
    """
    c = flops.count(model, input_size)
    headers = ["layer", "kind", "out", "MACs", "params"]
    align = "llrrr"
    if kept_of is not None:
        headers.insert(3, "kept/of")
        align = "llrrrr"
    if entry_of is not None:
        headers.append("entry")
        align += "r"
    plan = getattr(model, "hrank_plan", None)
    kept = plan.layers if plan is not None else {}
    rows = []
    for layer in c.layers:
        row = [layer.name, layer.kind, layer.out_channels, flops.format_count(layer.macs),
               flops.format_count(layer.params)]
        if kept_of is not None:
            row.insert(3, f"{len(kept[layer.name])}/{kept_of[layer.name]}" if layer.name in kept else "")
        if entry_of is not None:
            row.append(entry_of.get(layer.name, ""))
        rows.append(row)
    if title:
        print(title)
    print(format_table(headers, rows, align=align))
    print(f"total: {flops.format_count(c.macs)} MACs, {flops.format_count(c.params)} params "
          f"(conv+linear MACs, params without BN; input {'x'.join(map(str, input_size))})")
