"""Atomic file writes and output-path guards, so that nothing a user had is lost or left half-written."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.hrank-", suffix=".tmp", dir=path.parent)
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


def check_writable(path: str | os.PathLike, what: str = "output") -> None:
    """Raise unless ``path`` can be written: an existing directory must be writable, and a path to create needs
    a writable directory as its nearest existing ancestor. Checked up front, so no work is lost to it."""
    path = Path(path)
    target = path if path.is_dir() else path.parent
    probe = target.absolute()
    while not probe.exists():
        if probe.is_symlink():  # a dangling link: creating through it fails
            raise HRankError(f"cannot create {what} {path}: {probe} is a broken link")
        probe = probe.parent
    if not probe.is_dir():
        raise HRankError(f"cannot create {what} {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise HRankError(f"cannot write {what} {path}: no write permission in {probe}")


def check_output(path: str | os.PathLike, *, force: bool = False, is_dir: bool = False,
                 what: str = "output") -> Path:
    """What :func:`prepare_output` checks, writing nothing: an existing output without ``force``, a file where a
    directory is expected (or the reverse), and a place that cannot be written."""
    path = Path(path)
    if path.is_symlink() and not path.exists():  # a dangling link (or a loop) is still something the user made
        if not force:
            raise HRankError(f"{what} {path} is a symbolic link to nothing (use --force to replace it)")
    elif path.exists():
        kind = "directory" if path.is_dir() else "file"
        if not force:
            raise HRankError(f"{what} {kind} {path} already exists (use --force to overwrite)")
        if is_dir != path.is_dir():
            raise HRankError(f"{what} {path} is a {kind}, expected a {'directory' if is_dir else 'file'}")
    check_writable(path, what)
    return path


def prepare_output(path: str | os.PathLike, *, force: bool = False, is_dir: bool = False) -> Path:
    """Refuse to overwrite an existing output unless ``force``; with ``force`` an existing dir is replaced."""
    path = check_output(path, force=force, is_dir=is_dir)
    if path.exists() and is_dir:
        shutil.rmtree(path)
    if is_dir:
        path.mkdir(parents=True, exist_ok=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


# What _atomic leaves when the process is killed between creating its temporary file and renaming it:
# ``.NAME.hrank-XXXXXXXX.tmp`` (tempfile.mkstemp's eight random characters; before 2026-12-06 without "hrank-").
_OWN_TEMP = re.compile(r"\..+\.(hrank-)?[a-z0-9_]{8}\.tmp")
_OWN_TEMP_NOW = re.compile(r"\..+\.hrank-[a-z0-9_]{8}\.tmp")


def remove_own_temps(path: str | os.PathLike) -> int:
    """Remove the temporary files killed writes left under directory ``path`` (only ``.NAME.hrank-XXXXXXXX.tmp``
    regular files); :meth:`OutputLock.acquire` calls it once it holds the directory, so that no write is in
    flight. Returns how many were removed."""
    path = Path(path)
    removed = 0
    if path.is_dir():
        for p in path.rglob("*.tmp"):
            if _OWN_TEMP_NOW.fullmatch(p.name) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed += 1
    return removed


def holds_anything(path: str | os.PathLike) -> bool:
    """Whether directory ``path`` holds anything but hrank's own temporary files, which a kill during a write
    leaves behind (a directory holding only those is one an interrupted command created)."""
    path = Path(path)
    return path.is_dir() and any(not (_OWN_TEMP.fullmatch(p.name) and p.is_file()) for p in path.iterdir())


@dataclass(frozen=True)
class FreshOutput:
    """An output directory that held nothing before a command ran, and how to leave it so again if the
    command fails: remove the topmost directory it created, or empty the directory that was there."""

    path: Path
    created: Path | None  # the topmost missing directory on the way to ``path``; None when ``path`` existed

    @staticmethod
    def of(path: str | os.PathLike) -> FreshOutput | None:
        """The state of ``path`` now; None when it already holds something (then nothing is ever removed)."""
        path = Path(path)
        if path.exists():
            return FreshOutput(path, None) if path.is_dir() and not holds_anything(path) else None
        top = path.absolute()
        while not top.parent.exists():
            top = top.parent
        return FreshOutput(path, top)

    def undo(self) -> None:
        """Remove everything written since :meth:`of`."""
        if self.created is not None:
            shutil.rmtree(self.created, ignore_errors=True)
        elif self.path.is_dir():
            for child in self.path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink(missing_ok=True)


class OutputLock:
    """One process at a time per output directory: an exclusive ``flock`` on ``PARENT/.NAME.hrank-lock``, so
    that the same command started twice (two terminals, a resubmitted job) cannot interleave its checkpoints
    and records with the first's. The kernel drops the lock when its process dies (even by SIGKILL), so a
    killed run never blocks the next one; ``release`` removes the file. Taking the lock removes the temporary
    files killed writes left in the directory. The file sits beside the directory,
    which ``--force`` may delete and recreate. Where no lock can be made (no ``fcntl``, a read-only parent)
    there is none, as before."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.lock_path = self.path.absolute().parent / f".{self.path.absolute().name}.hrank-lock"
        self._fd: int | None = None

    def acquire(self) -> OutputLock:
        """Take the lock, or raise a one-line error naming the process that holds it."""
        try:
            import fcntl
        except ImportError:  # not POSIX
            return self
        try:
            self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            return self
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            except OSError:
                return self
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise HRankError(f"{self.path} is in use by another hrank process{who}; wait for it to finish "
                                 f"or use another --out") from None
            try:  # the holder before us may have removed the file between our open and our lock: retry
                same = os.stat(self.lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        remove_own_temps(self.path)  # what killed writes left: holding the lock, no write of ours is in flight
        return self

    def release(self) -> None:
        """Remove the lock file and drop the lock (nothing when not held)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)
            os.close(fd)

    def __del__(self) -> None:  # an owner dropped without release (a Run never executed) frees the directory
        try:  # noqa: SIM105 - at interpreter exit the modules it uses may be gone (the kernel frees the lock)
            self.release()
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return ``path`` as a Path, or raise a one-line error when it is missing, a directory or empty."""
    path = Path(path)
    if not path.exists():
        raise HRankError(f"{what} not found: {path}")
    if path.is_dir():
        raise HRankError(f"{what} is a directory, expected a file: {path}")
    if path.stat().st_size == 0:
        raise HRankError(f"{what} is empty: {path}")
    return path


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """A JSON file's content; a file that is not JSON is a one-line error naming the line and column."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HRankError(f"{what} {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except (UnicodeDecodeError, OSError) as e:
        raise HRankError(f"cannot read {what} {path}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def is_json_int(v: Any) -> bool:
    """An integer read from JSON or YAML (not a boolean, which Python counts as one)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_json_number(v: Any) -> bool:
    """A number read from JSON or YAML (not a boolean)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def describe_json(v: Any) -> str:
    """A JSON value for an error message about a damaged file: the value itself when short, else its kind."""
    if v is None or isinstance(v, bool):
        return json.dumps(v)
    if isinstance(v, (int, float)) or (isinstance(v, str) and len(v) <= 40):
        return repr(v)
    return {str: "a long string", list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def _error_line(e: BaseException) -> str:
    """An exception as one line, its type first (``RuntimeError: ...``), for messages that wrap it."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _torch_load_error(e: BaseException) -> str:
    """The useful part of torch.load's message: the safe unpickler's own reason, not its page of advice."""
    text = str(e)
    if "Weights only load failed" in text:
        reason = text.split("WeightsUnpickler error:", 1)[1].strip() if "WeightsUnpickler error:" in text else ""
        reason = reason.splitlines()[0].strip() if reason else "it holds more than tensors and plain data"
        return f"refused by the safe loader ({reason[:150]}); hrank reads only tensors and plain data, never code"
    return _first_line(e)


def load_torch_file(path: str | os.PathLike, what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True`` (never runs code from the file); problems are one line.

    torch's warnings about the file (e.g. an unusual pickle protocol) are silenced: the outcome is either the
    content or this function's one-line error.
    """
    path = require_file(path, what)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, not a torch file, or pickled code
        raise HRankError(f"cannot read {what} {path}: {_torch_load_error(e)}") from None


def load_yaml_mapping(path: str | os.PathLike, what: str = "config file") -> tuple[dict, str]:
    """A YAML (or JSON) file holding a mapping, and its text; parse errors give the line and column."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise HRankError(f"{what} not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise HRankError(f"{what} {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise HRankError(f"cannot read {what} {path}: {e.strerror or e}") from None
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
