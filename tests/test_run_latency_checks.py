"""``hrank run`` refuses what ``hrank prune`` refuses with a latency target (round_to, mask mode, huge latency
batches, a bad latency cache), up front; and the evaluate stage, which times the models, reruns when what it
times changes (latency, latency_batch, latency_layout), while an unchanged rerun still reruns nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hrank import config
from hrank.cli import main
from hrank.errors import HRankError
from hrank.run import STAGES, Run, run

TINY = {
    "model": "resnet_20", "val_size": 16, "rank_images": 32, "rank_batch_size": 16, "recalibrate_images": 32,
    "compress_rate": "[0.25]*19", "finetune": {"epochs": 1, "batch_size": 16}, "criterion": "l1",
    "baseline": {"epochs": 1, "batch_size": 16}, "latency_batch": 2, "export": [], "download": False,
}
LATENCY = {"compress_rate": None, "target_latency": 0.5}
QUIET = {"progress": False, "printer": lambda s: None}


def _cfg(data_dir: Path, **overrides) -> dict:
    return config.resolve({**TINY, "data_dir": str(data_dir)}, overrides)


def _cli(tmp_path: Path, capsys, *argv: str) -> str:
    """``hrank run`` on flags alone: exit code 2, one line on stderr, no run directory."""
    try:
        rc = main(["run", "--model", "resnet_20", "--no-download", "--data-dir", str(tmp_path / "nodata"),
                   "--out", str(tmp_path / "o"), *argv])
    except SystemExit as e:  # argparse's own one-line errors
        rc = e.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()
    return err


# -- 1. round_to with a latency target --------------------------------------------------------------------------

def test_round_to_with_a_latency_target_is_refused(tmp_path, capsys):
    for values, flags in (({**LATENCY, "round_to": 8}, {}), (LATENCY, {"round_to": 16}),
                          ({**LATENCY, "round_to": 1}, {})):
        with pytest.raises(HRankError, match=r"^round_to does not apply to target_latency: .*measured.*drop "
                                             r"round_to$"):
            config.resolve({"model": "resnet_20", **values}, flags)
    for bad in (0, -8):  # not a width multiple at all, with or without a latency target
        for values in (LATENCY, {"target_macs": 0.5}):
            with pytest.raises(HRankError, match=f"'round_to' must be >= 1, got {bad}"):
                config.resolve({"model": "resnet_20", **values, "round_to": bad}, {})
    # the default stays fine with a latency target, and a MACs target still takes round_to
    assert config.resolve({"model": "resnet_20", **LATENCY}, {})["target_latency"] == 0.5
    assert config.resolve({"model": "resnet_20", "target_macs": 0.5, "round_to": 16}, {})["round_to"] == 16
    err = _cli(tmp_path, capsys, "--target-latency", "0.5", "--round-to", "8")
    assert "round_to does not apply to target_latency" in err


# -- 2. mask mode with a latency target -------------------------------------------------------------------------

def test_a_latency_target_in_mask_mode_is_refused(tmp_path, capsys):
    with pytest.raises(HRankError, match=r"mode 'mask' .*dense model's speed; use mode physical"):
        config.resolve({"model": "resnet_20", **LATENCY, "mode": "mask"}, {})
    assert config.resolve({"model": "resnet_20", **LATENCY, "mode": "physical"}, {})["mode"] == "physical"
    assert config.resolve({"model": "resnet_20", "target_macs": 0.5, "mode": "mask"}, {})["mode"] == "mask"
    err = _cli(tmp_path, capsys, "--target-latency", "0.5", "--mode", "mask")
    assert "mode 'mask'" in err and "dense model's speed" in err


# -- 3. the latency keys' bounds ---------------------------------------------------------------------------------

def test_huge_latency_batches_and_threads_are_refused(tmp_path, capsys):
    from hrank.latency import MAX_BATCH, MAX_THREADS

    plain = {"model": "resnet_20", "compress_rate": "[0.1]*19"}
    for key, top, values in (("latency_batch", MAX_BATCH, plain), ("latency_target_batch", MAX_BATCH, LATENCY),
                             ("latency_threads", MAX_THREADS, LATENCY)):
        with pytest.raises(HRankError, match=rf"^config key '{key}' must be a whole number from 1 to {top}, got "
                                             rf"{top + 1}$"):
            config.resolve({"model": "resnet_20", **values, key: top + 1}, {})
        assert config.resolve({"model": "resnet_20", **values, key: top}, {})[key] == top  # the bound is fine
    with pytest.raises(HRankError, match="'latency_batch' must be >= 1, got 0"):
        config.resolve(plain, {"latency_batch": 0})
    err = _cli(tmp_path, capsys, "--compress-rate", "[0.1]*19", "--latency-batch", str(10**9))
    assert f"'latency_batch' must be a whole number from 1 to {MAX_BATCH}, got 1000000000" in err


# -- 4. the latency cache, checked before any work ---------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_bad_latency_cache_fails_before_any_stage(tiny_cifar, tmp_path, monkeypatch, capsys):
    out = tmp_path / "o"  # the run directory of _cli too
    (tmp_path / "file").write_text("x")
    for cache, msg in ((tmp_path / "file", "is a file"), (tmp_path / "file" / "sub", "cannot create latency cache"),
                       (out / "cache", "inside the output directory")):
        monkeypatch.setenv("HRANK_CACHE", str(cache))
        with pytest.raises(HRankError, match=msg):
            Run(_cfg(tiny_cifar, **LATENCY), out, **QUIET)  # the preflight: nothing has run, nothing is written
        assert not out.exists()
        err = _cli(tmp_path, capsys, "--target-latency", "0.5", "--criterion", "l1")
        assert msg in err
    # a good cache: the run directory is claimed, no stage has run
    monkeypatch.setenv("HRANK_CACHE", str(tmp_path / "cache"))
    Run(_cfg(tiny_cifar, **LATENCY), out, **QUIET)
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_cache_is_checked_whenever_the_search_will_run(tiny_cifar, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("HRANK_CACHE", str(tmp_path / "cache"))
    keys = Run(_cfg(tiny_cifar, **LATENCY), out, **QUIET).stage_keys
    for name in ("baseline.pt", "baseline.json", "scores.npz", "spec.json"):  # as a finished spec stage leaves them
        (out / name).write_text("{}")
    (tmp_path / "file").write_text("x")
    monkeypatch.setenv("HRANK_CACHE", str(tmp_path / "file"))

    def record(spec_key: str) -> None:
        state = {s: {"key": keys[s], "done": True} for s in ("baseline", "scores")}
        (out / "stages.json").write_text(json.dumps({**state, "spec": {"key": spec_key, "done": True}}))

    record("an older spec")  # a spec.json from other inputs: the search runs again, so the cache must be good
    with pytest.raises(HRankError, match="is a file"):
        Run(_cfg(tiny_cifar, **LATENCY), out, **QUIET)
    record(keys["spec"])  # the spec is done: no search, the cache is not used
    Run(_cfg(tiny_cifar, **LATENCY), out, **QUIET)
    (out / "scores.npz").unlink()  # ... unless a stage before it reruns
    with pytest.raises(HRankError, match="is a file"):
        Run(_cfg(tiny_cifar, **LATENCY), out, **QUIET)


# -- 5. the evaluate stage reruns when what it times changes -----------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the runs below: tiny models gain nothing from two, and on a loaded machine two threads
    waiting for each other make every step many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, one_thread):
    """One finished tiny run with latency timing (batch 2), shared; tests work on copies of it."""
    from tests.conftest import write_cifar

    root = tmp_path_factory.mktemp("latency-keys")
    data = write_cifar(root / "data")
    with pytest.warns(UserWarning):
        run(_cfg(data), root / "out", **QUIET)
    return root / "out", data


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run: (run dir, data dir)."""
    from tests.conftest import copy_run

    return copy_run(finished, tmp_path)


def _rerun(run_dir: Path, data: Path, **overrides) -> list[str]:
    """Run again (no --force); the stages that ran."""
    logs: list[str] = []
    run(_cfg(data, **overrides), run_dir, progress=False, printer=logs.append)
    skipped = {line.split("]")[0][1:] for line in logs if line.endswith("done before, skipped")}
    return [s for s in STAGES if s not in skipped]


def _final(run_dir: Path) -> dict:
    return json.loads((run_dir / "final.json").read_text())


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_an_unchanged_rerun_reruns_nothing(copy):
    run_dir, data = copy
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != "stages.json"}
    assert _rerun(run_dir, data) == []
    assert {name: (run_dir / name).read_bytes() for name in before} == before


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_new_latency_batch_is_measured_again(copy):
    run_dir, data = copy
    model = (run_dir / "model.pt").read_bytes()
    assert _final(run_dir)["latency_batch"] == 2
    assert _rerun(run_dir, data, latency_batch=3) == ["evaluate", "export", "report"]
    final = _final(run_dir)
    assert final["latency_batch"] == 3 and final["baseline_latency"]["latency_batch"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stages"][-1]["latency_batch"] == 3
    assert "at batch 3 on" in summary["facts"]["speed-up"]
    assert (run_dir / "model.pt").read_bytes() == model  # nothing before the evaluation reran
    assert _rerun(run_dir, data, latency_batch=3) == []  # and now it is done


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_new_latency_layout_is_measured_again(copy):
    run_dir, data = copy
    assert _final(run_dir)["latency_layout"] == "channels_last"
    assert _rerun(run_dir, data, latency_layout="nchw") == ["evaluate", "export", "report"]
    final = _final(run_dir)
    assert final["latency_layout"] == "nchw" and final["baseline_latency"]["latency_layout"] == "nchw"
    assert "nchw" in json.loads((run_dir / "summary.json").read_text())["facts"]["speed-up"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_latency_off_drops_the_old_timings(copy):
    run_dir, data = copy
    assert "latency_b1_ms" in _final(run_dir)
    assert _rerun(run_dir, data, latency=False) == ["evaluate", "export", "report"]
    final = _final(run_dir)
    assert not any(k.startswith("latency") for k in final) and "baseline_latency" not in final
    assert "speed-up" not in json.loads((run_dir / "summary.json").read_text())["facts"]
    # with no timing, its batch and layout change no measurement
    before = (run_dir / "final.json").read_bytes()
    assert "evaluate" not in _rerun(run_dir, data, latency=False, latency_batch=5, latency_layout="nchw")
    assert (run_dir / "final.json").read_bytes() == before


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_run_continued_on_another_kind_of_device_is_timed_again(copy, monkeypatch):
    """Latency is the device's: the times of the machine a run was measured on are not reported for another."""
    from hrank.run import Run

    run_dir, data = copy
    assert _rerun(run_dir, data) == []
    monkeypatch.setattr(Run, "_device_kind", lambda self: "cuda NVIDIA H100 80GB HBM3")  # as if moved to a GPU
    assert _rerun(run_dir, data) == ["evaluate", "export", "report"]
    assert _rerun(run_dir, data) == []
    assert _rerun(run_dir, data, latency=False) == ["evaluate", "export", "report"]
    monkeypatch.undo()  # back on the CPU: without timing, the device does not matter
    assert _rerun(run_dir, data, latency=False) == []
