"""Bad input, every command: exit code 2, one line on stderr, no traceback, and nothing written or overwritten.

One table; each row runs the CLI in-process against a shared workspace (tiny CIFAR data, small checkpoints,
a run config, files and directories a user already has) and compares the whole workspace before and after.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import hrank
from hrank import models
from hrank.cli import main
from hrank.errors import HRankError
from hrank.ranks import Ranks, model_fingerprint
from hrank.spec import MAX_RATE_ENTRIES, parse_rates
from tests.conftest import write_cifar
from tests.test_data_security import write_malicious

DATA = ["--data-dir", "{data}", "--no-download", "--device", "cpu"]
TRAIN = ["--epochs", "1", "--batch-size", "16", "--val-size", "16", "--no-progress", *DATA]
PRUNE = ["prune", "--model", "resnet_20", "--ranks", "{ranks}", "--out", "{ws}/never"]


def run_args(out: str = "{ws}/never", *, rate: bool = True) -> list[str]:
    """``hrank run`` on the tiny config (rates from --compress-rate unless ``rate`` is False)."""
    return ["run", "{ws}/tiny.yaml", "--out", out, "--no-progress", *(["--compress-rate", "[0.25]*19"] if rate else [])]


RUN = run_args()
EVAL = ["eval", "--model-file", "{model}", *DATA]


def _ranks_file(path: Path, arch: str) -> Path:
    model = models.create(arch)
    rng = np.random.default_rng(0)
    scores = {c: rng.random(model.get_submodule(c).out_channels) for c in models.prunable_convs(model)}
    Ranks(scores, 64, fingerprint=model_fingerprint(model), arch=arch).save(path)
    return path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """What a user has: data, checkpoints (good, NaN, not torch), a run config, their own files and folders."""
    ws = tmp_path_factory.mktemp("ws")
    write_cifar(ws / "data")
    evil_data = write_cifar(ws / "evil_data")
    write_malicious(evil_data / "cifar-10-batches-py" / "data_batch_1", ws / "marker")
    write_malicious(ws / "evil_batch", ws / "marker", "exec")
    torch.manual_seed(0)
    model = models.create("resnet_20")
    torch.save({"state_dict": model.state_dict()}, ws / "base.pt")
    hrank.save(model, ws / "model.pt")
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = float("nan")
    torch.save({"state_dict": model.state_dict()}, ws / "nan.pt")
    hrank.save(model, ws / "nan_model.pt")
    _ranks_file(ws / "ranks.npz", "resnet_20")
    _ranks_file(ws / "r56.npz", "resnet_56")
    (ws / "empty.npz").write_bytes(b"")
    with open(ws / "raw.pkl", "wb") as f:
        pickle.dump({"state_dict": {"w": [1.0, 2.0]}}, f, protocol=4)
    (ws / "junk.pt").write_bytes(b"not a checkpoint")
    (ws / "afile").write_text("a file the user has")
    (ws / "existing.json").write_text('{"keep": true}\n')
    (ws / "mine").mkdir()
    (ws / "mine" / "notes.txt").write_text("precious")
    (ws / "notjson").mkdir()
    (ws / "notjson" / "config.json").write_text("{not json")
    (ws / "readonly").mkdir()
    (ws / "tiny.yaml").write_text(
        f"model: resnet_20\ncheckpoint: {ws / 'base.pt'}\ndata_dir: {ws / 'data'}\ndownload: false\n"
        "val_size: 16\nrank_images: 32\nrank_batch_size: 16\nrecalibrate_images: 32\n"
        "finetune: {epochs: 1, batch_size: 16}\nlatency: false\nexport: []\n")
    return ws


CASES: list[tuple[str, list[str], str]] = [
    # --- security: a crafted CIFAR batch runs no code ---------------------------------------------------------
    ("malicious-train-batch", ["train", "--model", "resnet_20", "--out", "{ws}/never", *TRAIN[:-len(DATA)],
                               "--data-dir", "{ws}/evil_data", "--no-download", "--device", "cpu"],
     "refused to read CIFAR batch file"),
    ("malicious-eval-split", [*EVAL, "--split", "{ws}/evil_batch"], "names builtins.exec"),
    ("malicious-lossless-test", [*RUN, "--lossless-test", "{ws}/evil_batch"], "refused to read CIFAR batch file"),
    ("malicious-rank-data", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out",
                             "{ws}/never.npz", "--data-dir", "{ws}/evil_data", "--no-download"], "refused"),
    # --- tracebacks that were ------------------------------------------------------------------------------------
    ("rate-repeat-overflow", [*PRUNE, "--compress-rate", "[0.1]*1000000*1000000*1000000"],
     "expands to more than 19 entries"),
    ("rate-repeat-1e8", [*PRUNE, "--compress-rate", "[0.1]*100000000"], "expands to more than"),
    ("rate-repeat-digits", [*PRUNE, "--compress-rate", "[0.1]*" + "9" * 5000], "expands to more than"),
    ("run-rate-repeat-1e8", [*RUN, "--compress-rate", "[0.1]*100000000"], "expands to more than"),
    ("empty-ranks-npz", [*PRUNE[:-4], "--ranks", "{ws}/empty.npz", "--compress-rate", "[0.1]*19", "--out",
                         "{ws}/never"], "ranks file is empty"),
    ("train-seed-negative", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--seed", "-1", *TRAIN],
     "argument --seed: must be >= 0, got -1"),
    ("run-seed-negative", [*RUN, "--seed", "-1"], "'seed' must be >= 0"),
    ("run-workers-huge", [*RUN, "--workers", "1000000"], "'workers' must be a whole number from 0 to 256"),
    ("prune-workers-huge", [*PRUNE, "--compress-rate", "[0.1]*19", "--workers", "257"], "must be <= 256"),
    ("rank-workers-huge", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out",
                           "{ws}/never.npz", "--workers", "99999", *DATA], "must be <= 256"),
    ("prune-seed-negative", [*PRUNE, "--criterion", "random", "--rates", "layer1.*=0.5", "--seed", "-1"],
     "must be >= 0"),
    ("eval-seed-negative", [*EVAL, "--split", "val", "--seed", "-1"], "must be >= 0"),
    ("rank-seed-negative", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out",
                            "{ws}/never.npz", "--seed", "-1", *DATA], "must be >= 0"),
    ("prune-out-not-writable", [*PRUNE[:-1], "{ws}/readonly/out", "--compress-rate", "[0.1]*19"],
     "no write permission"),
    ("train-out-not-writable", ["train", "--model", "resnet_20", "--out", "{ws}/readonly/out", *TRAIN],
     "no write permission"),
    ("run-out-not-writable", run_args("{ws}/readonly/out"), "no write permission"),
    ("rank-out-not-writable", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out",
                               "{ws}/readonly/r.npz", *DATA], "no write permission"),
    ("eval-json-not-writable", [*EVAL, "--json", "{ws}/readonly/m.json"], "no write permission"),
    ("run-out-is-a-file", run_args("{ws}/afile"), "is a file, expected a directory"),
    ("train-out-is-a-file", ["train", "--model", "resnet_20", "--out", "{ws}/afile", *TRAIN], "is a file"),
    ("prune-out-is-a-file", [*PRUNE[:-1], "{ws}/afile", "--compress-rate", "[0.1]*19", "--force"],
     "is a file, expected a directory"),
    ("prune-out-under-a-file", [*PRUNE[:-1], "{ws}/afile/out", "--compress-rate", "[0.1]*19"],
     "is a file, not a directory"),
    ("rank-out-is-a-directory", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out",
                                 "{ws}/mine", "--force", *DATA], "is a directory, expected a file"),
    ("run-config-json-not-json", run_args("{ws}/notjson"), "is not valid JSON (line 1, column 2"),
    ("train-resume-config-not-json", ["train", "--model", "resnet_20", "--out", "{ws}/notjson", "--resume", *TRAIN],
     "is not valid JSON"),
    # --- accepted but meaningless ---------------------------------------------------------------------------------
    ("prune-eval-images-0", [*PRUNE, "--compress-rate", "[0.1]*19", "--eval-images", "0", *DATA[:3]],
     "argument --eval-images: must be >= 1, got 0"),
    ("prune-eval-images-without-data", [*PRUNE, "--compress-rate", "[0.1]*19", "--eval-images", "5"],
     "--eval-images needs data"),
    ("train-stop-after-negative", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--stop-after", "-1",
                                   *TRAIN], "argument --stop-after: must be >= 1"),
    ("train-stop-after-0", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--stop-after", "0", *TRAIN],
     "must be >= 1"),
    ("train-num-classes-0", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--num-classes", "0", *TRAIN],
     "argument --num-classes: must be >= 1"),
    ("run-num-classes-0", [*RUN, "--num-classes", "0"], "'num_classes' must be >= 1"),
    ("run-num-classes-wrong", [*RUN, "--num-classes", "7"], "checkpoint does not fit"),
    ("eval-num-classes-0", ["eval", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--num-classes", "0",
                            *DATA], "must be >= 1"),
    ("train-lr-inf", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--lr", "inf", *TRAIN],
     "recipe key 'lr' must be a number in (0, 10000]"),
    ("train-lr-nan", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--lr", "nan", *TRAIN],
     "recipe key 'lr' must be a number in (0, 10000]"),
    ("train-lr-huge", ["train", "--model", "resnet_20", "--out", "{ws}/never", "--lr", "1e300", *TRAIN],
     "recipe key 'lr' must be a number in (0, 10000]"),
    ("train-val-0", ["train", "--model", "resnet_20", "--out", "{ws}/never", *TRAIN, "--val-size", "0"],
     "no validation split to select the best epoch on"),
    ("run-val-0", [*RUN, "--val-size", "0"], "val_size 0 leaves no validation split"),
    ("run-lr-inf", [*RUN, "--finetune", "lr=.inf"], "'lr' must be a number in (0, 10000]"),
    ("prune-max-rate-inf", [*PRUNE, "--target-macs", "0.5", "--max-rate", "inf"], "must be a finite number"),
    ("run-max-rate-2", [*run_args(rate=False), "--target-macs", "0.5", "--max-rate", "2"],
     "'max_rate' must be in (0, 1)"),
    # --- search settings with no search: refused, not silently ignored --------------------------------------------
    ("prune-max-rate-no-target", [*PRUNE, "--compress-rate", "[0.1]*19", "--max-rate", "0.5"],
     "--max-rate tunes a --target-macs/--target-params/--target-latency search"),
    ("prune-order-no-target", [*PRUNE, "--compress-rate", "[0.1]*19", "--budget-order", "uniform", "--max-rate",
                               "0.5"], "--max-rate/--budget-order tune a"),
    ("run-round-to-no-target", [*RUN, "--round-to", "16"], "round_to tunes a target_macs/target_params/"),
    ("run-order-no-target", [*RUN, "--budget-order", "score", "--max-rate", "0.5"],
     "max_rate/budget_order tune a target_macs"),
    # --- silent garbage: non-finite weights or outputs ------------------------------------------------------------
    ("prune-nan-checkpoint", [*PRUNE, "--checkpoint", "{ws}/nan.pt", "--compress-rate", "[0.1]*19"],
     "holds non-finite weights (NaN or inf) in layer2.0.conv1.weight"),
    ("eval-nan-model-file", ["eval", "--model-file", "{ws}/nan_model.pt", *DATA], "non-finite weights"),
    ("eval-nan-checkpoint", ["eval", "--model", "resnet_20", "--checkpoint", "{ws}/nan.pt", *DATA],
     "non-finite weights"),
    ("finetune-nan-model-file", ["finetune", "--model-file", "{ws}/nan_model.pt", "--out", "{ws}/never", *TRAIN],
     "non-finite weights"),
    ("rank-nan-checkpoint", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/nan.pt", "--out",
                             "{ws}/never.npz", *DATA], "non-finite weights"),
    ("run-nan-checkpoint", [*RUN, "--checkpoint", "{ws}/nan.pt"], "non-finite weights"),
    # --- overwrites -------------------------------------------------------------------------------------------------
    ("eval-json-exists", [*EVAL, "--json", "{ws}/existing.json"], "already exists (use --force"),
    ("rank-out-exists", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out", "{ws}/ranks.npz",
                         *DATA], "already exists"),
    ("prune-out-exists", [*PRUNE[:-1], "{ws}/mine", "--compress-rate", "[0.1]*19"], "already exists"),
    ("train-out-not-empty", ["train", "--model", "resnet_20", "--out", "{ws}/mine", *TRAIN], "is not empty"),
    ("run-not-a-run-directory", run_args("{ws}/mine"), "not an hrank run directory"),
    # --- leftovers: errors found late used to leave files; now they are found before anything is written -----------
    ("run-val-size-too-large", [*RUN, "--val-size", "1000"], "leaves no training images"),
    ("run-lossless-not-cifar", [*RUN, "--lossless-test", "{ws}/raw.pkl"], "is not a CIFAR batch file"),
    ("run-finetune-batch-too-large", [*RUN, "--finetune", "batch_size=1000"],
     "finetune batch_size 1000 is larger than the training set"),
    ("run-rank-images-too-many", [*RUN, "--rank-images", "100000"], "rank_images 100000 is more than"),
    ("run-no-data", [*RUN, "--data-dir", "{ws}/nodata"], "cifar10 not found in"),
    ("run-unreachable-budget", [*run_args(rate=False), "--target-macs", "0.001"], "cannot be met"),
    ("train-batch-too-large", ["train", "--model", "resnet_20", "--out", "{ws}/never", *TRAIN, "--batch-size", "64"],
     "batch size 64 is larger than the training set"),
    ("train-resume-unrelated-dir", ["train", "--model", "resnet_20", "--out", "{ws}/mine", "--resume", *TRAIN],
     "holds no hrank training run"),
    ("train-resume-and-force", ["train", "--model", "resnet_20", "--out", "{ws}/mine", "--resume", "--force",
                                *TRAIN], "contradict"),
    ("finetune-layerwise-without-plan", ["finetune", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt",
                                         "--out", "{ws}/never", "--recipe", "hrank", *TRAIN], "needs the unpruned"),
    # --- two-line errors that were ------------------------------------------------------------------------------------
    ("eval-split-is-a-model-file", [*EVAL, "--split", "{model}"], "not a CIFAR batch file (it is a zip archive"),
    ("eval-model-file-raw-pickle", ["eval", "--model-file", "{ws}/raw.pkl", *DATA], "refused by the safe loader"),
    ("prune-checkpoint-raw-pickle", [*PRUNE, "--checkpoint", "{ws}/raw.pkl", "--compress-rate", "[0.1]*19"],
     "cannot read checkpoint"),
    ("eval-model-file-junk", ["eval", "--model-file", "{ws}/junk.pt", *DATA], "cannot read model file"),
    # --- validate before working --------------------------------------------------------------------------------
    ("prune-calib-images-0", [*PRUNE, "--compress-rate", "[0.1]*19", "--calib-images", "0", *DATA[:3]],
     "argument --calib-images: must be >= 1, got 0"),
    ("prune-batch-size-0", [*PRUNE, "--compress-rate", "[0.1]*19", "--batch-size", "0", *DATA[:3]], "must be >= 1"),
    ("rank-num-images-0", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out", "{ws}/never.npz",
                           "--num-images", "0", *DATA], "argument --num-images: must be >= 1"),
    ("prune-no-data-before-work", [*PRUNE, "--compress-rate", "[0.1]*19", "--data-dir", "{ws}/nodata",
                                   "--no-download"], "cifar10 not found in"),
    ("rank-no-data-before-work", ["rank", "--model", "resnet_20", "--checkpoint", "{ws}/base.pt", "--out",
                                  "{ws}/never.npz", "--data-dir", "{ws}/nodata", "--no-download"], "not found in"),
    # --- the existing ones ------------------------------------------------------------------------------------
    ("prune-ranks-of-another-model", [*PRUNE[:-4], "--ranks", "{ws}/r56.npz", "--compress-rate", "[0.5]*19", "--out",
                                      "{ws}/never"], "ranks are for resnet_56"),
    ("prune-rate-count", [*PRUNE, "--compress-rate", "[0.5]*18"], "expects 19"),
    ("prune-rate-syntax", [*PRUNE, "--compress-rate", "[0.5]*19+"], "syntax error at column 10"),
    ("prune-rate-removes-all", [*PRUNE, "--compress-rate", "[0.5]*18+[1.0]"], "would remove all"),
    ("prune-missing-checkpoint", [*PRUNE, "--checkpoint", "{ws}/missing.pt", "--compress-rate", "[0.5]*19"],
     "checkpoint not found"),
    ("prune-two-ways", [*PRUNE, "--target-macs", "0.5", "--compress-rate", "[0.5]*19"], "give one way"),
    ("prune-independent-physical", [*PRUNE, "--compress-rate", "[0.5]*19", "--independent"],
     "only valid with --mode mask"),
    ("info-unknown-model", ["info", "--model", "resnet_57"], "unknown model 'resnet_57'"),
    ("run-no-such-config", ["run", "no-such-config", "--out", "{ws}/never"], "config not found"),
    ("run-rate-count", [*RUN, "--compress-rate", "[0.1]*18"], "expects 19"),
    ("eval-missing-checkpoint", ["eval", "--model", "resnet_20", "--checkpoint", "{ws}/nope.pt", *DATA],
     "checkpoint not found"),
    ("eval-checkpoint-of-another-model", ["eval", "--model", "resnet_32", "--checkpoint", "{ws}/base.pt", *DATA],
     "does not fit resnet_32"),
]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file (with a hash of its bytes) and every directory under ``root``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _fill(args: list[str], ws: Path) -> list[str]:
    return [a.format(ws=ws, data=ws / "data", ranks=ws / "ranks.npz", model=ws / "model.pt") for a in args]


@pytest.mark.parametrize("name, argv, fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(name, argv, fragment, ws, capsys, monkeypatch):
    monkeypatch.setenv("HRANK_NO_PROGRESS", "1")
    readonly = ws / "readonly"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, *a, **k: False if Path(p) == readonly and mode & os.W_OK
                        else real_access(p, mode, *a, **k))  # root ignores chmod: say no for this directory
    before = _snapshot(ws)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main(_fill(argv, ws))
        except SystemExit as e:  # argparse's own errors (bad flag values)
            code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (name, code, err)
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("hrank: error: ") and "Traceback" not in err
    assert fragment in err, (fragment, err)
    assert _snapshot(ws) == before  # nothing written, overwritten or left behind (empty directories included)
    assert not (ws / "marker").exists()
    noisy = [str(w.message) for w in caught if "not the full official set" not in str(w.message)]
    assert not noisy  # e.g. torch's UserWarning about a raw pickle, which used to print before the error


# --- the compress-rate bound, directly ----------------------------------------------------------------------------

def test_rate_strings_are_bounded_before_expanding():
    with pytest.raises(HRankError, match=f"more than {MAX_RATE_ENTRIES} entries .* fixed bound {MAX_RATE_ENTRIES}"):
        parse_rates("[0.1]*1000000*1000000*1000000")
    with pytest.raises(HRankError, match=r"more than 19 entries \(from column 7\); the model has 19 rate entries"):
        parse_rates("[0.1]+[0.2]*19", max_entries=19)
    assert len(parse_rates(f"[0.1]*{MAX_RATE_ENTRIES}")) == MAX_RATE_ENTRIES
    assert parse_rates("[0.1]*100000000000000000000*0") == []
    assert parse_rates("2*[0.1, 0.2]*3", max_entries=12) == [0.1, 0.2] * 6
    with pytest.raises(HRankError, match="more than 3 entries"):
        parse_rates("[0.1, 0.1, 0.1, 0.1]", max_entries=3)


# --- failures after the checks leave a new output directory as it was -----------------------------------------------

def test_a_failed_first_epoch_leaves_no_directory(ws, tmp_path, capsys, monkeypatch):
    """An error during training, before any checkpoint, removes what the run created (parents included)."""
    from hrank import train

    def boom(*a, **k):
        raise train.NonFiniteLossError("loss became nan at epoch 1, step 1 of 3; training stopped")

    monkeypatch.setattr(train._Trainer, "train_epoch", boom)
    out = tmp_path / "a" / "b" / "run"
    assert main(["train", "--model", "resnet_20", "--out", str(out), *_fill(TRAIN, ws)]) == 2
    assert "loss became nan" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_run_errors_after_the_checks_leave_a_new_directory_as_it_was(ws, tmp_path, monkeypatch, capsys):
    from hrank import run as run_module

    def boom(self):
        raise HRankError("ranking failed")

    monkeypatch.setattr(run_module.Run, "_scores", boom)
    monkeypatch.setenv("HRANK_NO_PROGRESS", "1")
    out = tmp_path / "new" / "run"
    assert main(["run", str(ws / "tiny.yaml"), "--out", str(out), "--compress-rate", "[0.25]*19"]) == 2
    assert "ranking failed" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["run", str(ws / "tiny.yaml"), "--out", str(empty), "--compress-rate", "[0.25]*19"]) == 2
    assert empty.is_dir() and not any(empty.iterdir())


def test_eval_json_force_overwrites(ws, tmp_path, capsys):
    target = tmp_path / "m.json"
    target.write_text("{}")
    argv = _fill(EVAL, ws) + ["--json", str(target)]
    assert main(argv) == 2
    assert target.read_text() == "{}"
    assert main(argv + ["--force"]) == 0
    assert '"top1"' in target.read_text()


def test_non_finite_outputs_are_an_error_not_loss_nan(ws):
    """BatchNorm statistics can break a model whose weights look fine: evaluation refuses to report nan."""
    from hrank import train
    from hrank.data import load_cifar

    model, _ = hrank.load(ws / "model.pt")
    model.bn1.running_var.fill_(-1.0)  # finite, but sqrt of a negative variance is NaN
    with pytest.warns(UserWarning):
        test = load_cifar(ws / "data", "cifar10", "test", download=False)
    with pytest.raises(HRankError, match=r"outputs are not finite \(NaN or inf\) on 32 of 32 images"):
        train.evaluate(model, train.make_eval_batches(test, normalization="cifar", device=torch.device("cpu")))


# --- one process per output directory -----------------------------------------------------------------------------

def test_the_same_command_started_twice_stops_before_writing(ws, tmp_path, capsys, monkeypatch):
    """A second `hrank run` / `train --resume` on a directory in use would interleave its checkpoints and records
    with the first's: it is refused in one line, naming the holder, and writes nothing."""
    import signal
    import subprocess
    import sys

    from hrank.io import OutputLock

    monkeypatch.setenv("HRANK_NO_PROGRESS", "1")
    out = tmp_path / "runs" / "r"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("the first run's")
    hold = (f"import time; from hrank.io import OutputLock; lock = OutputLock({str(out)!r}).acquire(); "
            "print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        before = _snapshot(tmp_path)
        for argv in (["run", str(ws / "tiny.yaml"), "--out", str(out), "--compress-rate", "[0.25]*19", "--force"],
                     ["train", "--model", "resnet_20", "--out", str(out), "--force", *_fill(TRAIN, ws)]):
            capsys.readouterr()
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err == (f"hrank: error: {out} is in use by another hrank process (pid {holder.pid}); wait for it "
                           "to finish or use another --out\n"), err
            assert _snapshot(tmp_path) == before  # --force deleted nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # killed, its lock is gone with it (its file stays until the next holder releases it)
    assert main(["train", "--model", "resnet_20", "--out", str(tmp_path / "runs" / "r"), "--force",
                 *_fill(TRAIN, ws)]) == 0
    assert (out / "last.pt").exists() and sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["r"]
    # what SIGKILL during a write leaves is removed by the next command that holds the directory; nothing else
    leftovers = [out / ".last.pt.hrank-k2x_9a0b.tmp", out / "sub" / ".metrics.jsonl.hrank-00000000.tmp"]
    kept = [out / ".notes.20261206.tmp", out / "notes.hrank-abcdefgh.tmp", out / ".x.hrank-ABCDEFGH.tmp"]
    for f in leftovers + kept:
        f.parent.mkdir(exist_ok=True)
        f.write_text("partial")
    assert main(["train", "--model", "resnet_20", "--out", str(out), "--resume", *_fill(TRAIN, ws)]) == 0
    assert not any(f.exists() for f in leftovers) and all(f.read_text() == "partial" for f in kept)
    with OutputLock(out) as lock:  # in one process two holders exclude each other too (separate descriptions)
        assert lock.lock_path.exists()
        with pytest.raises(HRankError, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()
    assert not lock.lock_path.exists()


def test_decoding_workers_are_bounded_in_the_config_and_the_folder_split():
    import argparse

    from hrank import config
    from hrank.cli.common import WORKERS
    from hrank.imagefolder import MAX_WORKERS, FolderSplit

    assert WORKERS(str(MAX_WORKERS)) == MAX_WORKERS  # the CLI's bound is the loader's
    with pytest.raises(argparse.ArgumentTypeError):
        WORKERS(str(MAX_WORKERS + 1))
    base = {"model": "resnet_20", "compress_rate": "[0.1]*19"}
    assert config.resolve(base, {"workers": MAX_WORKERS})["workers"] == MAX_WORKERS
    with pytest.raises(HRankError, match=f"'workers' must be a whole number from 0 to {MAX_WORKERS}, got 1000000"):
        config.resolve({**base, "workers": 10**6}, {})
    empty = np.zeros(0, dtype="S1")
    with pytest.raises(HRankError, match=f"workers must be a whole number from 0 to {MAX_WORKERS}, got 257"):
        FolderSplit("x", empty, np.zeros(0, dtype=np.int64), ["a"], workers=257)
