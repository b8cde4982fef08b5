"""Data-free criteria produce per-filter scores in the same form as ranks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrank import models
from hrank.criteria import l1_scores, random_scores, weight_scores
from hrank.errors import HRankError


def test_l1_scores_are_filter_weight_norms():
    model = models.create("resnet_20")
    with torch.no_grad():
        model.conv1.weight.zero_()
        model.conv1.weight[3].fill_(0.5)
    scores = l1_scores(model, ["conv1", "layer1.0.conv1"])
    assert list(scores) == ["conv1", "layer1.0.conv1"]
    expected = np.zeros(16)
    expected[3] = 0.5 * 27
    np.testing.assert_allclose(scores["conv1"], expected)
    assert scores["layer1.0.conv1"].dtype == np.float64 and scores["layer1.0.conv1"].shape == (16,)


def test_random_scores_are_seeded():
    model = models.create("resnet_20")
    a = random_scores(model, seed=1)
    b = random_scores(model, seed=1)
    c = random_scores(model, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1"], c["conv1"])
    assert len(a) == 19  # every conv of ResNet-20


def test_unknown_criterion_and_layer():
    model = models.create("resnet_20")
    with pytest.raises(HRankError, match="unknown criterion"):
        weight_scores("taylor", model)
    with pytest.raises(HRankError, match="not a Conv2d"):
        l1_scores(model, ["bn1"])
