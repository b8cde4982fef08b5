"""Bug-hunt fixes in ``hrank run`` / ``hrank report``: damaged summary and stage records are one clear error,
``hrank report`` writes only into run directories, stale exports are removed, and ``latency_layout`` is part of
a run's identity exactly when it decides the pruned model (with a latency target)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hrank import config
from hrank.cli import main
from hrank.errors import HRankError
from hrank.report import load_summary
from hrank.run import Run, run

TINY = {
    "model": "resnet_20", "val_size": 16, "rank_images": 32, "rank_batch_size": 16, "recalibrate_images": 32,
    "compress_rate": "[0.25]*19", "finetune": {"epochs": 1, "batch_size": 16},
    "baseline": {"epochs": 1, "batch_size": 16}, "latency": False,
    "export": ["onnx", "torchscript"], "download": False,
}
QUIET = {"progress": False, "printer": lambda s: None}


def _cfg(data_dir: Path, **overrides) -> dict:
    return config.resolve({**TINY, "data_dir": str(data_dir)}, overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (ONNX and TorchScript exports), shared; tests work on copies of it."""
    pytest.importorskip("onnxruntime")
    from tests.conftest import write_cifar

    root = tmp_path_factory.mktemp("hunt")
    data = write_cifar(root / "data")
    run(_cfg(data), root / "out", **QUIET)
    return root / "out", data


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of the finished run: (run dir, data dir)."""
    from tests.conftest import copy_run

    return copy_run(finished, tmp_path)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- 1. hrank report: a damaged or wrong-shape summary.json ---------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("content", ["{not json", "[]", '{"x": 1}', '"a string"', "null",
                                     '{"title": "t", "stages": [{"name": "b", "macs": "many"}]}',
                                     '{"title": "t", "stages": [{"name": "b"}], "layers": [{"name": "c", '
                                     '"before": 4, "after": 1, "scores": [1, 2, 3, 4], "kept": [9]}]}'])
def test_report_with_a_damaged_summary_is_one_line(copy, capsys, content):
    run_dir, _ = copy
    before = (run_dir / "report.md").read_text()
    (run_dir / "summary.json").write_text(content)
    assert main(["report", str(run_dir)]) == 2
    err = _one_line_error(capsys)
    assert "summary.json" in err
    assert (run_dir / "report.md").read_text() == before  # nothing rewritten from it
    with pytest.raises(HRankError, match="summary.json"):
        load_summary(run_dir)


# -- 2. hrank report writes only into an hrank run directory --------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_refuses_a_folder_that_is_not_a_run(copy, tmp_path, capsys):
    run_dir, _ = copy
    foreign = tmp_path / "mine"
    foreign.mkdir()
    shutil.copyfile(run_dir / "summary.json", foreign / "summary.json")
    (foreign / "report.md").write_text("my own notes")
    assert main(["report", str(foreign)]) == 2
    assert "not an hrank run directory" in _one_line_error(capsys)
    (foreign / "config.json").write_text('{"name": "some other tool"}')  # a config.json hrank did not write
    assert main(["report", str(foreign)]) == 2
    assert "not an hrank run directory" in _one_line_error(capsys)
    assert (foreign / "report.md").read_text() == "my own notes"
    assert not (foreign / "report.html").exists() and not (foreign / "widths.png").exists()
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "not found" in _one_line_error(capsys)
    # a run's own report is rebuilt
    (run_dir / "report.md").write_text("stale")
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report.md").read_text().startswith("# hrank run: resnet_20")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_report_refuses_a_directory_a_running_command_holds(copy, capsys):
    from hrank.io import OutputLock

    run_dir, _ = copy
    (run_dir / "report.md").write_text("being written by the run")
    with OutputLock(run_dir):  # what a running `hrank run` (or a second report) holds
        assert main(["report", str(run_dir)]) == 2
        assert "is in use by another hrank process" in _one_line_error(capsys)
        assert (run_dir / "report.md").read_text() == "being written by the run"
    assert main(["report", str(run_dir)]) == 0  # released: rebuilt
    assert (run_dir / "report.md").read_text().startswith("# hrank run: resnet_20")


# -- 3. a damaged stage record inside a run directory ---------------------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, stage", [("baseline.json", "baseline"), ("spec.json", "spec"),
                                         ("prune.json", "prune"), ("finetune.json", "finetune"),
                                         ("final.json", "evaluate"), ("export.json", "export")])
def test_damaged_stage_record_is_a_clear_error(copy, name, stage):
    run_dir, data = copy
    for content in ("{not json", "[1, 2]"):
        (run_dir / name).write_text(content)
        with pytest.raises(HRankError, match=rf"{stage} record .*{name}.*delete it and rerun to redo the {stage} "
                                             "stage"):
            run(_cfg(data), run_dir, **QUIET)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_stage_record_with_wrong_values_is_not_used(copy):
    run_dir, data = copy
    final = json.loads((run_dir / "final.json").read_text())
    (run_dir / "final.json").write_text(json.dumps({**final, "macs": "22.9M"}))
    with pytest.raises(HRankError, match=r"evaluate record .*final.json has no valid 'macs'"):
        run(_cfg(data), run_dir, **QUIET)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_deleting_the_damaged_record_redoes_its_stage(copy):
    run_dir, data = copy
    good = json.loads((run_dir / "final.json").read_text())
    (run_dir / "final.json").write_text("{not json")
    with pytest.raises(HRankError, match="delete it"):
        run(_cfg(data, export=[]), run_dir, **QUIET)
    (run_dir / "final.json").unlink()
    logs: list[str] = []
    summary = run(_cfg(data, export=[]), run_dir, progress=False, printer=logs.append)
    assert [line.split("]")[0][1:] for line in logs if "skipped" in line] == \
        ["baseline", "scores", "spec", "plan", "prune", "finetune"]
    assert json.loads((run_dir / "final.json").read_text()) == good
    assert summary["stages"][-1]["macs"] == good["macs"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_damaged_finetune_log_is_a_clear_error(copy):
    run_dir, data = copy
    with open(run_dir / "finetune" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')
    with pytest.raises(HRankError, match=r"fine-tune log .*metrics.jsonl is damaged"):
        run(_cfg(data), run_dir, **QUIET)


# -- 4. a rerun with fewer export formats leaves no stale export --------------------------------------------

@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rerun_with_fewer_exports_removes_the_stale_files(copy):
    run_dir, data = copy
    assert (run_dir / "model.onnx").is_file() and (run_dir / "model.torchscript.pt").is_file()
    summary = run(_cfg(data, export=["onnx"]), run_dir, force=True, **QUIET)
    assert (run_dir / "model.onnx").is_file()
    assert not (run_dir / "model.torchscript.pt").exists()
    assert set(json.loads((run_dir / "export.json").read_text())) == {"onnx"} == set(summary["exports"])
    run(_cfg(data, export=[]), run_dir, **QUIET)
    assert not (run_dir / "model.onnx").exists() and not (run_dir / "model.torchscript.pt").exists()
    assert json.loads((run_dir / "export.json").read_text()) == {}


# -- 5. latency_layout: part of the identity exactly when a latency target is measured in it ------------------

def test_latency_layout_counts_only_with_a_latency_target():
    plain = config.resolve({**TINY}, {})
    assert "latency_layout" not in config.identity(plain)
    targeted = config.resolve({**TINY, "compress_rate": None, "target_latency": 0.7}, {})
    assert config.identity(targeted)["latency_layout"] == "channels_last"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_latency_layout_of_a_latency_target_needs_force(tiny_cifar, tmp_path):
    keys = {"compress_rate": None, "target_latency": 0.7, "criterion": "l1", "export": []}
    Run(_cfg(tiny_cifar, **keys), tmp_path / "out", **QUIET)  # claims the directory (config.json), runs nothing
    nchw = _cfg(tiny_cifar, **keys, latency_layout="nchw")
    with pytest.raises(HRankError, match=r"different config \(changed: latency_layout\)"):
        Run(nchw, tmp_path / "out", **QUIET)
    forced = Run(nchw, tmp_path / "out", force=True, **QUIET)
    assert forced._changed == ["latency_layout"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_latency_layout_without_a_target_keeps_the_model(copy):
    run_dir, data = copy
    model = (run_dir / "model.pt").read_bytes()
    logs: list[str] = []
    run(_cfg(data, latency_layout="nchw"), run_dir, progress=False, printer=logs.append)  # no --force needed
    skipped = [line.split("]")[0][1:] for line in logs if "skipped" in line]
    assert skipped == ["baseline", "scores", "spec", "plan", "prune", "finetune", "evaluate", "export"]
    assert (run_dir / "model.pt").read_bytes() == model


def test_claiming_a_run_directory_removes_what_killed_writes_left(tiny_cifar, tmp_path):
    keys = {"compress_rate": None, "target_latency": 0.7, "criterion": "l1", "export": []}
    out = tmp_path / "out"
    Run(_cfg(tiny_cifar, **keys), out, **QUIET)  # claims the directory (config.json), runs nothing
    (out / "finetune").mkdir()
    left = [out / ".stages.json.hrank-a1b2c3d4.tmp", out / "finetune" / ".last.pt.hrank-zz_00000.tmp"]
    mine = out / "finetune" / "notes.tmp"
    for f in [*left, mine]:
        f.write_text("partial")
    Run(_cfg(tiny_cifar, **keys), out, **QUIET)
    assert not any(f.exists() for f in left) and mine.exists()
