"""hrank run: the whole pipeline on tiny generated data; resume, config identity, config errors."""

from __future__ import annotations

import json

import pytest
import torch

import hrank
from hrank import config
from hrank.cli import main
from hrank.errors import HRankError
from hrank.run import run
from tests.helpers import hand_macs, max_rel_diff, onnx_output, own_accuracy, read_cifar_batch

TINY = {
    "model": "resnet_20", "val_size": 16, "rank_images": 32, "rank_batch_size": 16, "recalibrate_images": 32,
    "compress_rate": "[0.25]*19", "finetune": {"epochs": 1, "batch_size": 16},
    "baseline": {"epochs": 1, "batch_size": 16}, "latency_batch": 4,
    "export": ["onnx"], "download": False,
}


def _cfg(data_dir, **overrides):
    return config.resolve({**TINY, "data_dir": str(data_dir)}, overrides)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from tests.conftest import write_cifar

    root = tmp_path_factory.mktemp("run")
    data = write_cifar(root / "data")
    logs: list[str] = []
    summary = run(_cfg(data), root / "out", progress=False, printer=logs.append)
    return root, data, summary, logs


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pipeline_writes_every_artefact(finished):
    root, data, summary, logs = finished
    out = root / "out"
    for name in ("config.json", "baseline.pt", "baseline.json", "scores.npz", "spec.json", "plan.json", "pruned.pt",
                 "prune.json", "finetune/metrics.jsonl", "model.pt", "final.json", "model.onnx", "export.json",
                 "summary.json", "report.md", "report.html", "widths.png"):
        assert (out / name).exists(), name
    names = [s["name"] for s in summary["stages"]]
    assert names == ["baseline", "pruned, no fine-tune", "pruned + BN recalibration", "fine-tuned"]
    base, final = summary["stages"][0], summary["stages"][-1]
    assert final["macs"] < base["macs"] and final["params"] < base["params"]
    assert "latency_b1_ms" in final and "latency_b1_ms" in base
    # the reported accuracy is model.pt's on the 32 test images, evaluated here with a loop of our own
    model, meta = hrank.load(out / "model.pt")
    norm = meta["normalization"]
    images, labels = read_cifar_batch(data / "cifar-10-batches-py" / "test_batch")
    top1, top5 = own_accuracy(model, images, labels, norm["mean"], norm["std"])
    stored = json.loads((out / "final.json").read_text())
    assert abs(stored["test_top1"] - top1) <= 1e-9 and abs(stored["test_top5"] - top5) <= 1e-9
    assert final["test_top1"] == stored["test_top1"]
    assert final["macs"] == hand_macs(model) and base["macs"] == 40_551_040  # resnet_20: see test_prune_cli
    assert [row["name"] for row in summary["layers"]][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    widths = {row["name"]: row["after"] for row in summary["layers"]}
    assert widths["layer1.0.conv1"] == 12  # int(0.25 * 16) = 4 removed
    # the exported ONNX file computes what model.pt computes, on an input of our own
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ref = model(x).numpy()
    assert max_rel_diff(onnx_output(out / "model.onnx", x), ref) <= 1e-4
    assert any("[report]" in line for line in logs)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_rerun_skips_done_stages_and_refuses_other_configs(finished):
    root, data, _, _ = finished
    logs: list[str] = []
    run(_cfg(data), root / "out", progress=False, printer=logs.append)
    assert sum("skipped" in line for line in logs) == 9
    with pytest.raises(HRankError, match=r"different config \(changed: compress_rate\)"):
        run(_cfg(data, compress_rate="[0.5]*19"), root / "out", progress=False, printer=logs.append)


def _rerun_forced(finished, tmp_path, **changes):
    """The finished run copied, then rerun with --force and ``changes``: (summary, stages skipped, directory)."""
    import shutil

    root, data, _, _ = finished
    out = tmp_path / "copy"
    shutil.copytree(root / "out", out)
    logs: list[str] = []
    summary = run(_cfg(data, **changes), out, force=True, progress=False, printer=logs.append)
    return summary, [line.split("]")[0][1:] for line in logs if "skipped" in line], out


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_force_reruns_only_what_changed(finished, tmp_path):
    summary, skipped, _ = _rerun_forced(finished, tmp_path, compress_rate="[0.5]*19")
    assert skipped == ["baseline", "scores"]
    assert {row["name"]: row["after"] for row in summary["layers"]}["layer1.0.conv1"] == 8


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_force_with_another_test_subset_measures_the_baseline_on_it_too(finished, tmp_path):
    summary, skipped, out = _rerun_forced(finished, tmp_path, test_subset=8, export=[])
    data = finished[1]
    assert skipped == ["baseline", "scores", "spec", "plan", "prune", "finetune"]
    # the headline compares the two models on the same 8 images: the baseline's number is measured again
    model, meta = hrank.load(out / "baseline.pt")
    norm = meta["normalization"]
    images, labels = read_cifar_batch(data / "cifar-10-batches-py" / "test_batch")
    top1, _ = own_accuracy(model, images[:8], labels[:8], norm["mean"], norm["std"])
    assert abs(summary["stages"][0]["test_top1"] - top1) <= 1e-9
    assert f"test top-1 {top1:.2f}% ->" in summary["headline"]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_budget_and_l1_criterion(tiny_cifar, tmp_path):
    cfg = _cfg(tiny_cifar, compress_rate=None, target_macs=0.6, criterion="l1", export=[], latency=False)
    logs: list[str] = []
    summary = run(cfg, tmp_path / "out", progress=False, printer=logs.append)
    ratio = summary["stages"][-1]["macs"] / summary["stages"][0]["macs"]
    assert abs(ratio - 0.6) <= 0.006
    assert (tmp_path / "out" / "compress_rate.txt").read_text().startswith("[")
    assert any("budget:" in line for line in logs)
    budget = json.loads((tmp_path / "out" / "spec.json").read_text())["budget"]
    assert budget["round_to"] == 8  # the default: every pruned group keeps a multiple of 8 channels
    assert "widths in multiples of 8" in (tmp_path / "out" / "report.md").read_text()


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_latency_target(tiny_cifar, tmp_path, monkeypatch):
    monkeypatch.setenv("HRANK_CACHE", str(tmp_path / "cache"))
    cfg = _cfg(tiny_cifar, compress_rate=None, target_latency=0.7, latency_target_batch=2, latency_threads=1,
               criterion="l1", export=[], latency=False)
    logs: list[str] = []
    summary = run(cfg, tmp_path / "out", progress=False, printer=logs.append)
    budget = json.loads((tmp_path / "out" / "spec.json").read_text())["budget"]
    assert budget["metric"] == "latency" and budget["target"] == 0.7
    assert budget["setup"]["batch_size"] == 2 and budget["setup"]["threads"] == 1
    assert budget["measured"] == pytest.approx(budget["pruned_ms"] / budget["dense_ms"])
    assert summary["stages"][-1]["macs"] == budget["macs"] < summary["stages"][0]["macs"]
    assert list((tmp_path / "cache").glob("latency-*.json"))  # the layer table was kept for the next search
    assert "latency target 70% of the dense model, measured" in (tmp_path / "out" / "report.md").read_text()


def test_not_a_run_directory_is_refused(tiny_cifar, tmp_path):
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(HRankError, match="not an hrank run directory"):
        run(_cfg(tiny_cifar), tmp_path, progress=False, printer=lambda s: None)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_config_file_errors_name_key_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: resnet_20\ncompress_rate: '[0.1]*19'\nrank_imgs: 10\n")
    with pytest.raises(HRankError, match=r"unknown config key 'rank_imgs' \(bad.yaml line 3\)"):
        config.load_file(bad)
    bad.write_text("model: resnet_20\nrank_images: many\n")
    with pytest.raises(HRankError, match=r"'rank_images' \(bad.yaml line 2\) must be an integer"):
        config.load_file(bad)
    bad.write_text("model: resnet_20\nfinetune: {epochs: 2, lr_max: 3}\n")
    with pytest.raises(HRankError, match="lr_max"):
        config.load_file(bad)
    bad.write_text("model: [unclosed\n")
    with pytest.raises(HRankError, match=r"cannot parse .*bad.yaml at line 2"):
        config.load_file(bad)


def test_config_rules():
    with pytest.raises(HRankError, match="how much to prune"):
        config.resolve({"model": "resnet_20"}, {})
    with pytest.raises(HRankError, match="one target"):
        config.resolve({"model": "resnet_20", "target_macs": 0.5}, {"target_params": 0.5})
    with pytest.raises(HRankError, match="one target"):
        config.resolve({"model": "resnet_20", "target_latency": 0.5}, {"target_macs": 0.5})
    with pytest.raises(HRankError, match=r"target_latency is a fraction"):
        config.resolve({"model": "resnet_20", "target_latency": 1.5}, {})
    with pytest.raises(HRankError, match="only mode 'mask'"):
        config.resolve({"model": "resnet_20", "compress_rate": "[0.1]*19", "coupling": "independent"}, {})
    cfg = config.resolve({"model": "resnet_20", "compress_rate": "[0.1]*19", "finetune": {"epochs": 3}},
                         {"finetune": {"lr": 0.05}})
    recipe = config.finetune_recipe(cfg)
    assert (recipe.name, recipe.epochs, recipe.lr) == ("fast", 3, 0.05)


def test_cli_run_errors_are_one_line(tmp_path, capsys):
    assert main(["run", "no-such-config"]) == 2
    assert "config not found" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("model: resnet_20\ncompress_rate: '[0.1]*19'\nseed: x\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "'seed' (c.yaml line 3) must be an integer" in err and err.count("\n") == 1
    (tmp_path / "c.yaml").write_text("model: resnet_20\ncompress_rate: '[0.1]*19'\n")
    assert main(["run", str(tmp_path / "c.yaml"), "--seed", "1", "--compress-rate", "[0.1]*18", "--data-dir",
                 str(tmp_path / "nodata"), "--no-download", "--out", str(tmp_path / "o2")]) == 2
    assert "expects 19" in capsys.readouterr().err


def test_bundled_configs_are_valid():
    from hrank.cli.run import BUNDLED

    names = sorted(p.stem for p in BUNDLED.glob("*.yaml"))
    assert "quick" in names
    for name in names:
        config.resolve(config.load_file(BUNDLED / f"{name}.yaml"), {})


def test_budget_order_key_matches_the_library():
    from hrank import budget

    key = config.KEYS["budget_order"]
    assert key.choices == budget.ORDERS and key.default == budget.ORDER_DEFAULT
    assert config.KEYS["round_to"].default == budget.ROUND_TO_DEFAULT
    with pytest.raises(HRankError, match="'round_to' must be >= 1, got 0"):
        config.resolve({"model": "resnet_20", "target_macs": 0.5, "round_to": 0}, {})


def test_missing_data_offline_fails_before_writing(tmp_path):
    cfg = config.resolve({**TINY, "data_dir": str(tmp_path / "nodata")}, {})
    with pytest.raises(HRankError, match=r"cifar10 not found in .*nodata .*pass --data-dir"):
        run(cfg, tmp_path / "out", progress=False, printer=lambda s: None)
    assert not (tmp_path / "out").exists()


def test_unreachable_budget_fails_before_ranking(tiny_cifar, tmp_path):
    cfg = _cfg(tiny_cifar, compress_rate=None, target_macs=0.001)
    with pytest.raises(HRankError, match=r"cannot be met with max_rate 0.9; the closest achievable is"):
        run(cfg, tmp_path / "out", progress=False, printer=lambda s: None)
    assert not (tmp_path / "out").exists()  # nothing trained, ranked or written
