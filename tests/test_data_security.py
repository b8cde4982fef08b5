"""CIFAR files from elsewhere run no code: a restricted unpickler for batch files, a verified and safe download."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hrank import data
from hrank.cli import main
from hrank.data import load_batch_files, load_batch_pickle, load_cifar
from hrank.errors import HRankError
from tests.conftest import write_cifar


class _System:
    """Unpickling it calls os.system (what a crafted batch file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _Exec:
    """Unpickling it calls builtins.exec."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def write_malicious(path: Path, marker: Path, kind: str = "system", protocol: int = 2) -> Path:
    """A CIFAR-looking batch whose ``data`` entry runs code when unpickled naively."""
    payload = _System(marker) if kind == "system" else _Exec(marker)
    with open(path, "wb") as f:
        pickle.dump({b"data": payload, b"labels": [0], b"batch_label": b"evil"}, f, protocol=protocol)
    return path


@pytest.mark.parametrize("kind", ["system", "exec"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_batch_is_refused_and_runs_nothing(tmp_path: Path, kind: str, protocol: int):
    marker = tmp_path / "marker"
    bad = write_malicious(tmp_path / "data_batch_1", marker, kind, protocol)
    with pytest.raises(HRankError, match=r"refused to read CIFAR batch file .*data_batch_1: it names "
                                         r"(posix\.system|nt\.system|builtins\.exec|__builtin__\.exec)"):
        load_batch_pickle(bad)
    assert not marker.exists()


def test_malicious_files_through_every_entry_point(tmp_path: Path, capsys):
    marker = tmp_path / "marker"
    root = write_cifar(tmp_path / "d")
    write_malicious(root / "cifar-10-batches-py" / "data_batch_1", marker)
    with pytest.raises(HRankError, match="refused"):
        load_cifar(root, "cifar10", "train", download=False)
    evil = write_malicious(tmp_path / "evil_batch", marker, "exec")
    with pytest.raises(HRankError, match="refused"):
        load_batch_files([evil], 10)
    # the meta file (class names) goes through the same unpickler
    write_malicious(root / "cifar-10-batches-py" / "batches.meta", marker)
    with pytest.raises(HRankError, match="batches.meta"):
        load_cifar(root, "cifar10", "test", download=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_plain_batches_still_load(tmp_path: Path, protocol: int):
    path = tmp_path / "b"
    labels = [np.int64(3), 1, 2]  # numpy scalars among the labels are plain data too
    with open(path, "wb") as f:
        pickle.dump({b"data": np.arange(3 * 3072, dtype=np.uint8).reshape(3, 3072), b"labels": labels,
                     "filenames": ["a.png", "b.png", "c.png"], b"extra": (1.5, None, True)}, f, protocol=protocol)
    images = load_batch_files([path], 10)
    assert images.labels.tolist() == [3, 1, 2] and images.images.shape == (3, 3, 32, 32)


def test_object_arrays_and_other_types_are_refused(tmp_path: Path):
    path = tmp_path / "b"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.array([1, "x"], dtype=object), b"labels": [0]}, f, protocol=2)
    with pytest.raises(HRankError, match="dtype 'O8'"):
        load_batch_pickle(path)
    with open(path, "wb") as f:
        pickle.dump({b"data": {1, 2}, b"labels": [0]}, f, protocol=2)  # a set needs builtins.set
    with pytest.raises(HRankError, match=r"(__builtin__|builtins)\.set"):
        load_batch_pickle(path)


def test_not_a_batch_file_is_one_line(tmp_path: Path):
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(HRankError, match="is empty"):
        load_batch_pickle(tmp_path / "empty")
    (tmp_path / "zip").write_bytes(b"PK\x03\x04rest")
    with pytest.raises(HRankError, match="zip archive"):
        load_batch_pickle(tmp_path / "zip")
    (tmp_path / "text").write_bytes(b"hello\nworld\n")
    with pytest.raises(HRankError) as e:
        load_batch_pickle(tmp_path / "text")
    assert "\n" not in str(e.value)


# --- download: checksum before extraction, no member outside the target -------------------------------------

def _tar(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return path


def _fake_download(monkeypatch, archive: Path, md5: str | None = None) -> list[str]:
    """Serve ``archive`` instead of the network; the expected checksum is ``md5`` (default: the archive's)."""
    calls: list[str] = []

    def retrieve(url, filename):
        calls.append(url)
        Path(filename).write_bytes(archive.read_bytes())

    digest = md5 or hashlib.md5(archive.read_bytes()).hexdigest()
    monkeypatch.setattr(data.urllib.request, "urlretrieve", retrieve)
    monkeypatch.setitem(data.SOURCES, "cifar10", data.SOURCES["cifar10"].__class__(
        **{**data.SOURCES["cifar10"].__dict__, "md5": digest}))
    return calls


def test_download_with_a_wrong_checksum_extracts_nothing(tmp_path: Path, monkeypatch):
    archive = _tar(tmp_path / "a.tar.gz", {"cifar-10-batches-py/data_batch_1": b"x"})
    _fake_download(monkeypatch, archive, md5="0" * 32)
    target = tmp_path / "data"
    with pytest.raises(HRankError, match="wrong MD5"):
        data.download_cifar(target)
    assert sorted(p.name for p in target.iterdir()) == []  # no archive, no .part, nothing extracted


def test_an_existing_archive_with_a_wrong_checksum_is_fetched_again(tmp_path: Path, monkeypatch):
    good = _tar(tmp_path / "good.tar.gz", {"cifar-10-batches-py/readme": b"good"})
    calls = _fake_download(monkeypatch, good)
    target = tmp_path / "data"
    target.mkdir()
    _tar(target / "cifar-10-python.tar.gz", {"cifar-10-batches-py/readme": b"tampered"})
    data.download_cifar(target)
    assert len(calls) == 1 and (target / "cifar-10-batches-py" / "readme").read_bytes() == b"good"


@pytest.mark.parametrize("members, links", [
    ({"../escaped": b"x"}, None),
    ({"cifar-10-batches-py/../../escaped": b"x"}, None),
    ({"/tmp/escaped-absolute": b"x"}, None),
    ({}, {"cifar-10-batches-py/link": "../../escaped"}),
])
def test_archive_members_outside_the_target_are_refused(tmp_path: Path, monkeypatch, members, links):
    archive = _tar(tmp_path / "evil.tar.gz", members, links)
    _fake_download(monkeypatch, archive)  # even with a matching checksum
    target = tmp_path / "inner" / "data"
    with pytest.raises(HRankError, match="refused to extract"):
        data.download_cifar(target)
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "inner" / "escaped").exists()
    assert not Path("/tmp/escaped-absolute").exists()
    assert not (target / "cifar-10-batches-py").exists()


def test_cli_eval_split_with_a_malicious_file(tmp_path: Path, tiny_cifar: Path, capsys):
    import hrank
    from hrank import models

    hrank.save(models.create("resnet_20"), tmp_path / "m.pt")
    marker = tmp_path / "marker"
    evil = write_malicious(tmp_path / "lossless_batch", marker)
    assert main(["eval", "--model-file", str(tmp_path / "m.pt"), "--split", str(evil), "--data-dir",
                 str(tiny_cifar), "--no-download", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "refused to read CIFAR batch file" in err and not marker.exists()
