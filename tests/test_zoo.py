"""Acceptance over the model zoo: every torchvision classification CNN and 45 timm CNNs (29 families), random
weights, through automatic ranks, a 0.3-everywhere spec, the plan, physical and mask pruning (which must agree),
fewer MACs, a bit-exact save/load round trip and an ONNX export that matches PyTorch.

The pipeline lives in ``bench/zoo.py`` (which also writes the coverage table of docs/zoo.md); this file runs it
once per model. Needs torchvision (the ``vision`` extra), timm and onnxruntime: CI runs it in a second
virtualenv (see .ci/run). Models that fail for a reason docs/zoo.md explains are strict xfails at the stage
they are known to fail in; any other failure, or one of them passing, fails the test. ``HRANK_ZOO_ALL=1``
also runs the few models sampled out of CI for time; ``HRANK_ZOO_SHARD=i/n`` keeps every n-th model from the
i-th on (CI runs two shards side by side, one per core).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "zoo.md"


def _load_zoo():
    spec = importlib.util.spec_from_file_location("bench_zoo", ROOT / "bench" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

# Known failures: model id -> (stage, reason). Each reason is a heading of docs/zoo.md's "Known failures".
KNOWN: dict[str, tuple[str, str]] = {
    "timm/nf_resnet26": ("plan", "every conv's channels feed a weight-standardized conv (ScaledStdConv2d)"),
}

# Sampled out of CI (each alone would take a large share of its 15-minute budget); HRANK_ZOO_ALL=1 runs them.
HEAVY: dict[str, str] = {
    "tv/densenet161": "dependency analysis of DenseNet concatenations, 40-50 s",
    "tv/densenet169": "dependency analysis of DenseNet concatenations, 50 s",
    "tv/densenet201": "dependency analysis of DenseNet concatenations, 90-150 s",
    "tv/regnet_y_128gf": "644M parameters, 90-105 s, about 8 GB",
}

RUN_ALL = os.environ.get("HRANK_ZOO_ALL", "") not in ("", "0")


def _shard() -> tuple[int, int]:
    text = os.environ.get("HRANK_ZOO_SHARD", "0/1")
    m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
        raise pytest.UsageError(f"HRANK_ZOO_SHARD must be i/n with 0 <= i < n, got {text!r}")
    return int(m.group(1)), int(m.group(2))


SHARD = _shard()


class KnownFailure(Exception):
    """The model failed at the stage docs/zoo.md documents for it."""


def _params(cases, offset: int = 0):
    """pytest params of this shard's cases (``offset``: index of the first case in the whole zoo)."""
    index, count = SHARD
    out = []
    for k, case in enumerate(cases, offset):
        if k % count != index:
            continue
        marks = []
        if case.id in KNOWN:
            stage, reason = KNOWN[case.id]
            marks.append(pytest.mark.xfail(strict=True, raises=KnownFailure, reason=f"{stage}: {reason}"))
        if case.id in HEAVY and not RUN_ALL:
            marks.append(pytest.mark.skip(reason=f"sampled out of CI ({HEAVY[case.id]}); HRANK_ZOO_ALL=1 runs it"))
        out.append(pytest.param(case, id=case.id, marks=marks))
    return out


TV_CASES = zoo.torchvision_cases()
try:
    TIMM_CASES = zoo.timm_cases()
except ImportError:
    TIMM_CASES = []


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the budget was measured (and outputs compared bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check(case, tmp_path: Path) -> None:
    r = zoo.run_case(case, tmp_path)
    if r.failure is not None:
        known = KNOWN.get(case.id)
        if known is not None and r.failure.stage == known[0]:
            raise KnownFailure(r.status)
        pytest.fail(f"{case.id} failed at {r.status}", pytrace=False)
    assert r.ranked > 0 and r.pruned_groups > 0
    assert r.rel_err is not None and r.rel_err <= zoo.MAX_REL_ERR
    assert 0 < r.macs_after < r.macs_before
    assert r.onnx_diff is not None


@pytest.mark.parametrize("case", _params(TV_CASES))
def test_torchvision_model(case, tmp_path):
    _check(case, tmp_path)


@pytest.mark.parametrize("case", _params(TIMM_CASES, len(TV_CASES)))
def test_timm_model(case, tmp_path):
    _check(case, tmp_path)


def test_zoo_covers_torchvision_and_timm_families():
    """Every torchvision classification model except the transformers; at least 20 timm CNN families."""
    import torchvision

    listed = torchvision.models.list_models(module=torchvision.models)
    assert {c.name for c in TV_CASES} == {n for n in listed if not n.startswith(("vit_", "swin_", "maxvit_"))}
    assert len(TV_CASES) >= 60
    if TIMM_CASES:
        assert len({c.family for c in TIMM_CASES}) >= 20
    assert set(KNOWN) | set(HEAVY) <= {c.id for c in TV_CASES + TIMM_CASES}


def test_known_failures_are_documented():
    """Each xfail reason is explained in docs/zoo.md, and each model listed there as failing is in KNOWN."""
    text = DOC.read_text(encoding="utf-8")
    for model, (_stage, reason) in KNOWN.items():
        assert reason in text, f"{model}: reason {reason!r} not documented in docs/zoo.md"
    section = text.split("## Known failures", 1)[1].split("\n## ", 1)[0] if "## Known failures" in text else ""
    listed = set(re.findall(r"`((?:tv|timm)/[\w.]+)`", section))
    assert listed == set(KNOWN), f"docs/zoo.md lists {sorted(listed ^ set(KNOWN))} differently from KNOWN"
    for model, why in HEAVY.items():
        assert f"`{model}`" in text, f"{model} ({why}) is sampled out of CI but docs/zoo.md does not say so"
