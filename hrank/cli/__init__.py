"""The ``hrank`` command line: argument parsing only; every command calls the library."""

from __future__ import annotations

import argparse
import importlib
import sys

from hrank import __version__
from hrank.errors import HRankError

# One module per command, each with add_parser(subparsers) and run(args) -> exit code.
COMMANDS = ["info", "rank", "prune", "train", "run"]


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments in one line with exit code 2 (its default code)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"hrank: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hrank", description="HRank filter pruning: rank, prune, fine-tune, report.")
    parser.add_argument("--version", action="version", version=f"hrank {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        importlib.import_module(f"hrank.cli.{name}").add_parser(sub)
    return parser


def _one_line(text: str) -> str:
    """An error message on one line: line breaks (from a path, a file's text) are shown escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hrank`` script; user errors print one line and return 2."""
    try:
        parser = build_parser()  # imports torch (a second or more): Ctrl-C here is an interruption too
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        return int(args.func(args) or 0)
    except HRankError as e:
        print(f"hrank: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # the file system said no after the up-front checks (a race, a full disk): still one line
        where = f": {e.filename}" if e.filename else ""
        print(f"hrank: error: {_one_line(f'{e.strerror or e}{where}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hrank: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
