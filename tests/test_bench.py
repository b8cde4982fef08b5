"""Smoke test of the latency benchmark script: it runs end to end and prints one row per model and layout."""

from __future__ import annotations

import importlib.util
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
