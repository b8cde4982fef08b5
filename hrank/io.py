"""Atomic file writes and output-path guards, so that nothing a user had is lost or left half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hrank.errors import HRankError

_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write through ``write(tmp_path)`` into a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a text file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return _atomic(path, write)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a binary file atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return _atomic(path, write)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically: a crash never leaves a truncated checkpoint at ``path``."""
    return _atomic(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_with(path: str | os.PathLike, writer: Callable[[str], None]) -> Path:
    """Atomically write ``path`` with any writer that takes a file name (ONNX, TorchScript, savefig)."""
    return _atomic(path, writer)


def prepare_output(path: str | os.PathLike, *, force: bool = False, is_dir: bool = False) -> Path:
    """Refuse to overwrite an existing output unless ``force``; with ``force`` an existing dir is replaced."""
    path = Path(path)
    if path.exists():
        if not force:
            kind = "directory" if path.is_dir() else "file"
            raise HRankError(f"output {kind} {path} already exists (use --force to overwrite)")
        if is_dir and path.is_dir():
            shutil.rmtree(path)
    if is_dir:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error when it is missing."""
    path = Path(path)
    if not path.exists():
        raise HRankError(f"{what} not found: {path}")
    if path.is_dir():
        raise HRankError(f"{what} is a directory, expected a file: {path}")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def load_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True`` (never runs code from the file); problems are one line."""
    path = require_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, not a torch file, or pickled code
        raise HRankError(f"cannot read {what} {path}: {_first_line(e)}") from None


def load_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> tuple[dict, str]:
    """A YAML (or JSON) file holding a mapping, and its text; parse errors give the line and column."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HRankError(f"{what} not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise HRankError(f"cannot parse {what} {path}{at}: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise HRankError(f"{what} {path} must hold a mapping, got {type(data).__name__}")
    return data, text
