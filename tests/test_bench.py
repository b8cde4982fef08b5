"""Smoke tests of the benchmark scripts: latency (one row per model and layout) and rank speed (agreement)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench" / "latency.py"


def _load():
    spec = importlib.util.spec_from_file_location("bench_latency", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_latency_benchmark_prints_every_model_and_layout(capsys):
    pytest.importorskip("onnxruntime")
    bench = _load()
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--batches", "2", "--repeats", "2", "--warmup", "1", "--threads", "1",
                           "--onnxruntime"]) == 0
    finally:
        torch.set_num_threads(threads)  # the script sets it for the whole process
    out = capsys.readouterr().out
    assert "widths in multiples of 8" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("cpu ")]
    seen = {(r[1], r[3]) for r in rows}
    expected = {(layout, model) for layout in ("nchw", "channels_last") for model in ("dense", "physical", "mask")}
    assert seen == expected | {("onnxruntime", "dense"), ("onnxruntime", "physical")}
    for r in rows:  # MAC reduction: 1.00x for dense and mask, about 2x for the physically pruned network
        reduction = float(r[5].rstrip("x"))
        assert (1.9 <= reduction <= 2.1) if r[3] == "physical" else reduction == 1.0
        assert float(r[6]) > 0  # a measured median, in ms


RANK_SPEED = Path(__file__).resolve().parents[1] / "bench" / "rank_speed.py"


def test_rank_speed_benchmark_agrees_with_the_official_method(tmp_path, capsys):
    """bench/rank_speed.py on a tiny random ResNet-20: both methods run, the ranks and kept sets agree."""
    spec = importlib.util.spec_from_file_location("bench_rank_speed", RANK_SPEED)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out_json = tmp_path / "r.json"
    assert bench.main(["--model", "resnet_20", "--checkpoint", "none", "--random-images", "--images", "2",
                       "--batch-size", "2", "--official-images", "1", "--skip-floor", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "random weights" in out and "first 1 of the 2 images" in out
    r = json.loads(out_json.read_text())
    assert r["official_passes"] == 19 and r["official_images"] == 1
    assert r["identical_fraction"] == 1.0 and r["max_mean_diff"] == 0.0
    assert r["kept_identical"] + r["kept_tie_equivalent"] == r["kept_convs"] == 19 and not r["kept_differ"]
    assert r["speedup"] > 0 and r["hrank_s"] > 0 and r["forward_s"] > 0
