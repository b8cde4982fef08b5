"""Reports: markdown + self-contained HTML + PNG plots from a summary dict; latency/size helpers."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from hrank import models
from hrank.profile import compare_latency, measure_latency, state_dict_bytes
from hrank.report import markdown_table, write_report


def _summary():
    rng = np.random.default_rng(0)
    layers = []
    for i, c in enumerate([16, 16, 32]):
        scores = rng.uniform(0, 32, c)
        kept = np.sort(np.argsort(scores)[c // 2:])
        layers.append({"name": f"conv{i}", "before": c, "after": len(kept), "scores": scores.tolist(),
                       "kept": kept.tolist(), "mean_rank_kept": float(scores[kept].mean()),
                       "mean_rank_removed": float(np.delete(scores, kept).mean())})
    curves = [{"epoch": e, "train_loss": 1.0 / e, "val_top1": 50 + e, "train_top1": 60.0} for e in (1, 2, 3)]
    stages = [{"name": "baseline", "macs": 125_485_696, "params": 848_954, "test_top1": 93.26},
              {"name": "fine-tuned", "macs": 62_000_000, "params": 400_000, "test_top1": 93.1, "size_bytes": 2**20}]
    return {"title": "demo run", "facts": {"model": "resnet_56"}, "stages": stages, "layers": layers,
            "curves": curves, "notes": ["selected on the validation split"]}


def test_write_report_files_and_contents(tmp_path):
    pytest.importorskip("matplotlib")
    md, html = write_report(tmp_path, _summary())
    text = md.read_text()
    assert "| baseline | 125.49M | 0.85M | 93.26% |" in text
    assert "| fine-tuned | 62.00M | 0.40M | 93.10% | 1.00 MiB |" in text
    assert "| 3 | conv2 | 32 | 16 | 16 |" in text
    for png in ("ranks.png", "widths.png", "curves.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"]({png})" in text
    page = html.read_text()
    assert page.count("data:image/png;base64,") == 3
    assert not re.search(r"src=['\"](?!data:)", page)  # self-contained
    assert "selected on the validation split" in page


def test_report_without_optional_parts(tmp_path):
    md, _ = write_report(tmp_path, {"title": "t", "stages": [{"name": "baseline", "macs": 10}]})
    assert "| baseline | 10 |" in md.read_text()
    assert not (tmp_path / "ranks.png").exists()


def test_markdown_table():
    assert markdown_table(["a", "b"], [[1, 2]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_latency_and_size():
    model = models.create("resnet_20").train()
    lat = measure_latency(model, (3, 32, 32), batch_size=2, warmup=1, repeats=3)
    assert lat.repeats >= 3 and 0 < lat.p10_ms <= lat.median_ms <= lat.p90_ms
    assert lat.images_per_s > 0 and model.training
    size = state_dict_bytes(model)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert n_bytes < size < n_bytes + 200_000
    assert torch.is_grad_enabled()


def test_compare_latency_alternates_and_pools_samples():
    big, small = models.create("resnet_20"), models.create("resnet_20")
    calls: list[str] = []
    for name, m in (("big", big), ("small", small)):
        m.register_forward_pre_hook(lambda mod, inp, name=name: calls.append(name))
    out = compare_latency({"big": big, "small": small}, (3, 32, 32), 2, device="cpu", rounds=2, repeats=2,
                          warmup=1)
    assert set(out) == {"big", "small"}
    assert all(lat.repeats == 4 and len(lat.samples_ms) == 4 for lat in out.values())
    # percentiles stay inside the measured range (no extrapolation below the fastest run)
    assert all(min(lat.samples_ms) <= lat.p10_ms <= lat.median_ms <= lat.p90_ms <= max(lat.samples_ms)
               for lat in out.values())
    # alternation: each round runs one model's warm-up + repeats, then the other's
    assert calls == (["big"] * 3 + ["small"] * 3) * 2
