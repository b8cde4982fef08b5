"""CHIP scores (hrank.chip, compute_scores, the "chip" criterion) against a direct per-channel SVD computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hrank import criteria, models
from hrank.chip import CHIP_METHODS, chip_scores
from hrank.errors import HRankError
from hrank.ranks import Ranks, compute_ranks, compute_scores, find_rank_points


def direct(maps: torch.Tensor) -> torch.Tensor:
    """CHIP by its definition, one matrix at a time: ||A||_* - ||A with row c zeroed||_* (float64 SVDs)."""
    n, c = maps.shape[:2]
    a = maps.reshape(n, c, -1).double()
    out = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        full = torch.linalg.matrix_norm(a[i], ord="nuc")
        for j in range(c):
            masked = a[i].clone()
            masked[j] = 0
            out[i, j] = full - torch.linalg.matrix_norm(masked, ord="nuc")
    return out


@pytest.mark.parametrize("shape", [(3, 5, 4, 4), (3, 8, 2, 3), (2, 6, 1, 1), (2, 1, 3, 3), (4, 16, 8, 8),
                                   (2, 40, 3, 3), (2, 12, 5, 7), (1, 3, 1, 9)])
@pytest.mark.parametrize("method", CHIP_METHODS)
def test_equals_direct_svd_on_random_maps(shape, method):
    g = torch.Generator().manual_seed(sum(shape))
    maps = torch.relu(torch.randn(shape, generator=g))
    maps[0, 0] = 0  # a dead channel scores exactly 0
    if shape[1] > 2:
        maps[-1, 2] = maps[-1, 1] * 3  # linearly dependent rows
    ref = direct(maps)
    got = chip_scores(maps, method=method, chunk_elems=64)  # tiny chunks: the chunking is exercised too
    assert got.dtype == torch.float64 and got.shape == ref.shape
    # float64 throughout; rank-deficient maps cost the Gram paths ~sqrt(eps) * sigma_max at worst
    assert torch.allclose(got, ref, rtol=0, atol=1e-7 * float(ref.abs().max()))
    assert float(got[0, 0]) == 0.0


def test_scores_are_positive_and_ordered():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 6, 10, generator=g)
    a[0, 3] *= 10  # a dominant channel is the most important
    s = chip_scores(a)
    assert (s > 0).all() and int(s.argmax()) == 3


def test_nan_maps_and_bad_input():
    maps = torch.ones(2, 3, 2, 2)
    maps[1, 0, 0, 0] = float("nan")
    s = chip_scores(maps)
    assert torch.isfinite(s[0]).all() and torch.isnan(s[1]).all()
    with pytest.raises(HRankError):
        chip_scores(maps, method="nope")
    with pytest.raises(HRankError):
        chip_scores(torch.ones(3, 3))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = models.create("resnet_20").eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return model


def _hooked(model, x, point):
    out = {}
    h = model.get_submodule(point.module).register_forward_hook(lambda m, i, o: out.__setitem__("y", o))
    with torch.no_grad():
        model(x)
    h.remove()
    return out["y"]


def test_compute_scores_one_pass_both_criteria():
    model = _model()
    x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    both = compute_scores(model, x, num_images=10, batch_size=4, progress=False)
    alone = compute_ranks(model, x, num_images=10, batch_size=4, progress=False)
    assert set(both) == {"hrank", "chip"}
    for conv in alone.scores:  # HRank's ranks are unchanged by computing CHIP alongside
        np.testing.assert_array_equal(both["hrank"].scores[conv], alone.scores[conv])
    chip = both["chip"]
    assert chip.meta["criterion"] == "chip" and chip.num_images == 10 and list(chip.scores) == list(alone.scores)
    points = find_rank_points(model)
    for conv in ("conv1", "layer1.0.conv1", "layer2.2.conv2", "layer3.1.conv1"):
        ref = direct(_hooked(model, x, points[conv])).mean(0).numpy()
        np.testing.assert_allclose(chip.scores[conv], ref, rtol=1e-6, atol=1e-8 * ref.max())
    svd = compute_scores(model, x, ("chip",), num_images=10, batch_size=4, progress=False, chip_method="svd")
    for conv in chip.scores:
        ref = svd["chip"].scores[conv]
        np.testing.assert_allclose(chip.scores[conv], ref, rtol=1e-6, atol=1e-8 * ref.max())
    with pytest.raises(HRankError):
        compute_scores(model, x, ("l1",), num_images=10, progress=False)


def test_chip_criterion_makes_a_plan(tmp_path):
    from hrank.data import ImageSet
    from hrank.plan import make_plan

    assert "chip" in criteria.names()
    model = _model()
    imgs = torch.randint(0, 256, (12, 3, 32, 32), generator=torch.Generator().manual_seed(2), dtype=torch.uint8)

    class Split:  # what criteria need from a hrank.data.Split
        def rank_input(self, **kw):
            return ImageSet(imgs, torch.zeros(12, dtype=torch.long), [str(i) for i in range(10)], "random")

    ranks = criteria.score("chip", model, criteria.ScoreInputs(data=Split(), num_images=8, batch_size=4,
                                                                progress=False))
    assert isinstance(ranks, Ranks) and ranks.meta["criterion"] == "chip"
    ranks.save(tmp_path / "chip.npz")
    again = Ranks.load(tmp_path / "chip.npz", model)
    conv = models.prunable_convs(model)[1]
    np.testing.assert_array_equal(again.scores[conv], ranks.scores[conv])
    plan = make_plan(model, again, {c: 0.5 for c in models.prunable_convs(model)}, criterion="chip")
    assert plan is not None


def test_real_resnet56_fast_path_equals_direct(real_cifar10, pretrained_resnet56):
    """Opt-in: on real ResNet-56 maps the fast path equals the direct SVD computation."""
    from hrank.data import Normalization, load_cifar
    from hrank.ranks import _imageset_batches

    model = models.create("resnet_56")
    models.load_checkpoint(model, pretrained_resnet56)
    model.eval()
    data = load_cifar(real_cifar10, "cifar10", "train", download=False)
    gen, _ = _imageset_batches(data, 16, 16, seed=0, augment=True, norm=Normalization.get("imagenet"),
                               device=torch.device("cpu"), rank=0, world=1)
    x = next(gen)
    fast = compute_scores(model, x, ("chip",), num_images=16, batch_size=16, progress=False)["chip"]
    points = find_rank_points(model)
    for conv in ("conv1", "layer1.4.conv2", "layer2.0.conv1", "layer2.8.conv2", "layer3.3.conv1", "layer3.8.conv2"):
        ref = chip_scores(_hooked(model, x, points[conv]), method="svd").mean(0).numpy()
        np.testing.assert_allclose(fast.scores[conv], ref, rtol=1e-6, atol=1e-8 * ref.max())
