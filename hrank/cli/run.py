"""``hrank run CONFIG`` (the whole pipeline) and ``hrank report RUN_DIR`` (rebuild a run's report)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from hrank import config
from hrank.errors import HRankError

BUNDLED = Path(__file__).resolve().parent.parent / "configs"


def _scalar(text: str):
    """A command-line value read as a YAML scalar (numbers, true/false, null, strings)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _pairs(items: list[str] | None, flag: str) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise HRankError(f"{flag} expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        out[key.strip()] = _scalar(value)
    return out


def find_config(name: str) -> Path:
    """A config path, or the name of a bundled config (``quick``, ``resnet_56``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    for cand in (BUNDLED / name, BUNDLED / f"{name}.yaml"):
        if cand.is_file():
            return cand
    known = ", ".join(sorted(p.stem for p in BUNDLED.glob("*.yaml")))
    raise HRankError(f"config not found: {name} (a YAML file, or a bundled config: {known})")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="the whole pipeline: ranks, plan, prune, fine-tune, evaluate, report, export",
        description="Prune a trained model end to end. Every config key is also a flag (flags win). Re-running "
                    "the same command continues an interrupted run; completed stages are skipped.")
    p.add_argument("config", nargs="?", help="YAML config file or bundled config name (quick, resnet_56, ...)")
    p.add_argument("--out", help="run directory (default: runs/<config name>)")
    p.add_argument("--force", action="store_true",
                   help="accept a run directory made with a different config (stages whose inputs changed rerun)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    keys = p.add_argument_group("config keys (override the file)")
    for key, spec in config.KEYS.items():
        flag = "--" + key.replace("_", "-")
        text = spec.help
        if "(default" not in text and spec.default not in (None, {}):
            shown = ",".join(spec.default) if isinstance(spec.default, list) else spec.default
            text += f" (default: {str(shown).lower() if isinstance(shown, bool) else shown})"
        if spec.types == (bool,):
            keys.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None, help=text)
        elif key in ("baseline", "finetune"):
            keys.add_argument(flag, dest=key, action="append", metavar="KEY=VALUE", default=None,
                              help=text + "; repeatable")
        elif key in ("rates", "export", "compress_rate", "target_macs", "target_params"):
            keys.add_argument(flag, dest=key, default=None, help=text, metavar="VALUE")
        else:
            metavar = "{" + ",".join(spec.choices) + "}" if spec.choices else \
                ("N" if spec.types == (int,) else key.split("_")[-1].upper())
            keys.add_argument(flag, dest=key, default=None, type=str, metavar=metavar, choices=spec.choices,
                              help=text)
    p.set_defaults(func=run)

    r = sub.add_parser("report", help="rebuild the report (md, html, plots) of a finished run directory")
    r.add_argument("run_dir", help="a directory written by hrank run")
    r.set_defaults(func=report)


def _overrides(args: argparse.Namespace) -> dict:
    out = {}
    for key, spec in config.KEYS.items():
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in ("baseline", "finetune"):
            value = _pairs(value, "--" + key)
        elif key == "export":
            value = [] if value.strip().lower() in ("", "none") else value
        elif key in ("compress_rate", "rates") or spec.types == (bool,):
            pass
        elif spec.choices is None:
            value = _scalar(value)
            if str in spec.types and not isinstance(value, str) and not isinstance(value, (int, float)):
                value = str(value)
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from hrank.run import run as run_pipeline

    values = config.load_file(find_config(args.config)) if args.config else {}
    cfg = config.resolve(values, _overrides(args))
    name = Path(args.config).stem if args.config else cfg["model"]
    out = Path(args.out) if args.out else Path("runs") / name
    from hrank.distributed import process_group_scope

    with process_group_scope():  # the process group the pipeline joins under torchrun, if any
        run_pipeline(cfg, out, force=args.force, progress=not args.no_progress and os.environ.get("HRANK_NO_PROGRESS")
                     is None)
    return 0


def report(args: argparse.Namespace) -> int:
    from hrank.report import rebuild_report

    md, html = rebuild_report(args.run_dir)
    print(f"wrote {md} and {html}")
    return 0
