"""Resume that always resumes: a kill after any single file write of a training run, then a resume, ends
bit-identical to an uninterrupted run (fault injection at every write, one at a time and all in a row)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hrank import io, train
from tests.test_train import TinyNet, _fit, _recipe, _same


class Killed(BaseException):
    """What a kill looks like to the code: nothing catches it, nothing after it runs."""


class WriteCounter:
    """Counts the run's file writes (atomic writes and metrics lines) and raises Killed right after the
    kill_at-th one, or after the first one ``kill_if(name)`` accepts."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kill_at: int | None = None, kill_if=None) -> None:
        self.count, self.kill_at, self.kill_if, self.names = 0, kill_at, kill_if, []
        real_atomic, real_record = io._atomic, train._Log.record
        counter = self

        def atomic(path, write):
            out = real_atomic(path, write)
            counter.wrote(Path(path).name)
            return out

        def record(log, row):
            real_record(log, row)
            if log.enabled:
                counter.wrote("metrics line")

        monkeypatch.setattr(io, "_atomic", atomic)
        monkeypatch.setattr(train._Log, "record", record)

    def wrote(self, name: str) -> None:
        self.count += 1
        self.names.append(name)
        if self.count == self.kill_at or (self.kill_if is not None and self.kill_if(name)):
            raise Killed(name)


def _five_epochs():
    """On the tiny fixture (seed 0) validation top-1 improves at epochs 1, 2 and 4, not at 3 and 5: both paths."""
    return _recipe(epochs=5, lr=0.01)


def _outcome(run_dir: Path) -> dict:
    """What a finished run leaves: selected, last and best weights, best epoch, metrics without timings."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("images_per_s"), row.pop("epoch_s")
    best = train.read_checkpoint(run_dir / "best.pt")
    summary = json.loads((run_dir / "summary.json").read_text())
    model, _ = train.load_model_file(run_dir / "model.pt", builder=TinyNet)
    return {"model": model.state_dict(), "last": train.read_checkpoint(run_dir / "last.pt")["model"]["state_dict"],
            "best": best["model"]["state_dict"], "best_epoch": best["epoch"], "rows": rows,
            "summary": {k: summary[k] for k in ("best_epoch", "best_metric", "val", "test", "epochs_run")}}


def _assert_same(a: dict, b: dict, label: str) -> None:
    for key in ("model", "last", "best"):
        assert _same(a[key], b[key]), f"{label}: {key} weights differ"
    for key in ("best_epoch", "rows", "summary"):
        assert a[key] == b[key], f"{label}: {key} differs"


def test_a_kill_after_any_write_resumes_bit_identically(tmp_path: Path, cifar_sets, monkeypatch):
    r = _five_epochs()
    with monkeypatch.context() as m:
        counter = WriteCounter(m)
        _fit(cifar_sets, tmp_path / "full", r)
    total, names = counter.count, counter.names
    reference = _outcome(tmp_path / "full")
    # the run writes config.json, per epoch a metrics line, last.pt and (when improved) best.pt, then model.pt
    # and summary.json; at least one epoch must not improve, or the test would not cover that path
    assert names[0] == "config.json" and names[-2:] == ["model.pt", "summary.json"]
    assert names.count("last.pt") == 5 and 2 <= names.count("best.pt") < 5, names
    for n in range(1, total + 1):
        run_dir = tmp_path / f"kill_{n}"
        with monkeypatch.context() as m:
            WriteCounter(m, kill_at=n)
            with pytest.raises(Killed):
                _fit(cifar_sets, run_dir, r)
        if names[n - 1] == "last.pt" and names[n] == "best.pt":  # the pair that used to be stuck: best lags
            last_epoch = train.read_checkpoint(run_dir / "last.pt")["epoch"]
            assert not (run_dir / "best.pt").exists() or \
                train.read_checkpoint(run_dir / "best.pt")["epoch"] < last_epoch
        torch.manual_seed(1234)  # the resumed process starts with other global RNG state (_fit seeds the init)
        _, res = _fit(cifar_sets, run_dir, r, resume=True)
        assert res.completed, n
        _assert_same(_outcome(run_dir), reference, f"killed after write {n} ({names[n - 1]})")
        shutil.rmtree(run_dir)


def test_killed_after_every_write_in_a_row(tmp_path: Path, cifar_sets, monkeypatch):
    """Each resumed process is itself killed right after its first write, until the run completes."""
    r = _five_epochs()
    _fit(cifar_sets, tmp_path / "full", r)
    reference = _outcome(tmp_path / "full")
    run_dir = tmp_path / "run"
    seen: set[tuple] = set()
    killed: list[str] = []
    for _ in range(200):
        # a write's place: the epoch the attempt resumed from, the file, its how-many-th write in the attempt;
        # every attempt is killed after the first write at a place no attempt was killed at before
        start = train.read_checkpoint(run_dir / "last.pt")["epoch"] if (run_dir / "last.pt").exists() else 0
        written: list[str] = []

        def new_place(name: str, start=start, written=written) -> bool:
            written.append(name)
            place = (start, name, written.count(name))
            if place in seen:
                return False
            seen.add(place)
            killed.append(name)
            return True

        with monkeypatch.context() as m:
            WriteCounter(m, kill_if=new_place)
            try:
                _, res = _fit(cifar_sets, run_dir, r, resume=run_dir.exists())
            except Killed:
                continue
        assert res.completed
        break
    else:
        pytest.fail("the run never completed")
    assert {"config.json", "metrics line", "last.pt", "best.pt", "model.pt", "summary.json"} <= set(killed)
    _assert_same(_outcome(run_dir), reference, "killed after every write")


def test_best_written_before_last_by_an_older_hrank_still_resumes(tmp_path: Path, cifar_sets):
    """The old write order (best.pt, then last.pt) could leave best.pt one epoch ahead of last.pt."""
    r = _five_epochs()
    _fit(cifar_sets, tmp_path / "full", r)
    reference = _outcome(tmp_path / "full")
    improved = [row["epoch"] for row, prev in zip(reference["rows"][1:], reference["rows"], strict=False)
                if row["val_top1"] > max(x["val_top1"] for x in reference["rows"][: row["epoch"] - 1])]
    assert improved, reference["rows"]
    k = improved[-1]
    _fit(cifar_sets, tmp_path / "ahead", r, stop_after_epoch=k)  # best.pt of epoch k
    _fit(cifar_sets, tmp_path / "run", r, stop_after_epoch=k - 1)  # last.pt of epoch k - 1
    shutil.copyfile(tmp_path / "ahead" / "best.pt", tmp_path / "run" / "best.pt")
    _, res = _fit(cifar_sets, tmp_path / "run", r, resume=True)
    assert res.completed
    _assert_same(_outcome(tmp_path / "run"), reference, "legacy order")
