"""Distillation from the unpruned model: the loss as defined, the teacher's effect, bit-exact resume, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from hrank import train
from hrank.errors import HRankError
from tests.test_train import TinyNet, _fit, _recipe, _same


def test_distill_loss_is_the_defined_mixture():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    y = torch.tensor([0, 3, 6, 2, 2])
    w, temp = 0.3, 2.5
    got = train.distill_loss(s, t, y, weight=w, temperature=temp)
    # by hand: cross-entropy and KL(p_t || p_s) from their definitions, in float64
    s64, t64 = s.double(), t.double()
    ce = -(s64.log_softmax(1)[torch.arange(5), y]).mean()
    p_t = (t64 / temp).softmax(1)
    kl = (p_t * ((t64 / temp).log_softmax(1) - (s64 / temp).log_softmax(1))).sum(1).mean()
    want = (1 - w) * ce + w * temp ** 2 * kl
    assert math.isclose(float(got), float(want), rel_tol=1e-6)
    # weight 0: exactly the cross-entropy; teacher == student at weight 1: zero
    assert float(train.distill_loss(s, t, y, weight=0.0, temperature=temp)) == pytest.approx(float(ce), rel=1e-6)
    assert abs(float(train.distill_loss(s, s, y, weight=1.0, temperature=temp))) < 1e-6
    # label smoothing reaches the hard term
    smooth = train.distill_loss(s, t, y, weight=0.0, temperature=temp, label_smoothing=0.1)
    assert float(smooth) == pytest.approx(float(nn.functional.cross_entropy(s, y, label_smoothing=0.1)), rel=1e-6)


def _teacher(seed: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    return TinyNet()


def test_distillation_changes_training_and_needs_a_teacher(tmp_path: Path, cifar_sets):
    plain, _ = _fit(cifar_sets, tmp_path / "plain", _recipe(epochs=1))
    taught, res = _fit(cifar_sets, tmp_path / "taught", _recipe(epochs=1, distill_weight=0.7), teacher=_teacher())
    assert res.completed
    assert not _same(plain.state_dict(), taught.state_dict())  # the soft targets moved the weights
    # a teacher equal to nothing useful but fixed: two runs with the same teacher are identical
    again, _ = _fit(cifar_sets, tmp_path / "again", _recipe(epochs=1, distill_weight=0.7), teacher=_teacher())
    assert _same(taught.state_dict(), again.state_dict())
    with pytest.raises(HRankError, match="no teacher"):
        _fit(cifar_sets, tmp_path / "none", _recipe(epochs=1, distill_weight=0.5))
    with pytest.raises(HRankError, match="distill_weight"):
        _recipe(distill_weight=1.5).validate()


def test_distillation_resume_is_bit_identical_and_refuses_another_teacher(tmp_path: Path, cifar_sets):
    r = _recipe(epochs=3, distill_weight=0.5, distill_temperature=3.0)
    full, res_full = _fit(cifar_sets, tmp_path / "full", r, teacher=_teacher())
    _fit(cifar_sets, tmp_path / "part", r, teacher=_teacher(), stop_after_epoch=1)
    torch.manual_seed(99)
    resumed, res = _fit(cifar_sets, tmp_path / "part", r, model=TinyNet(), resume=True, teacher=_teacher())
    assert res.completed and res.best_epoch == res_full.best_epoch
    assert _same(full.state_dict(), resumed.state_dict())
    last_full = train.read_checkpoint(tmp_path / "full" / "last.pt")["model"]["state_dict"]
    last_resumed = train.read_checkpoint(tmp_path / "part" / "last.pt")["model"]["state_dict"]
    assert _same(last_full, last_resumed)
    _fit(cifar_sets, tmp_path / "other", r, teacher=_teacher(), stop_after_epoch=1)
    with pytest.raises(HRankError, match="teacher"):
        _fit(cifar_sets, tmp_path / "other", r, model=TinyNet(), resume=True, teacher=_teacher(seed=6))


def test_cli_finetune_distills_from_the_unpruned_model(tmp_path: Path, tiny_cifar: Path, capsys):
    import json

    from hrank import models
    from hrank.cli import main
    from hrank.criteria import l1_scores
    from hrank.plan import make_plan
    from hrank.spec import Spec
    from tests.test_train import _cli_common

    torch.manual_seed(0)
    base = models.create("resnet_20")
    ckpt = tmp_path / "base.th"
    torch.save(base.state_dict(), ckpt)
    plan = make_plan(base, l1_scores(base), Spec.from_string(base, "[0.25]*19"))
    plan.save(tmp_path / "plan.json")
    common = ["--epochs", "1", "--batch-size", "16", "--val-size", "16", *_cli_common(tiny_cifar)]
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--plan", str(tmp_path / "plan.json"),
                 "--distill", "--out", str(out), *common]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["recipe"]["distill_weight"] == 0.5 and len(cfg["run"]["teacher"]) == 16  # teacher fingerprinted
    capsys.readouterr()
    # a pruned model file has no unpruned teacher of its own: one line, exit 2, nothing written
    assert main(["finetune", "--model-file", str(out / "model.pt"), "--distill", "--out", str(tmp_path / "x"),
                 *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--teacher" in err and not (tmp_path / "x").exists()
    assert main(["finetune", "--model-file", str(out / "model.pt"), "--teacher", str(out / "model.pt"),
                 "--distill", "--out", str(tmp_path / "y"), *common]) == 2
    assert "pruned model" in capsys.readouterr().err


def test_fit_leaves_the_callers_teacher_as_it_was(tmp_path: Path, cifar_sets):
    # the teacher is often the model the next student is cut from: fit must not freeze it or change its mode
    teacher = _teacher().train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    _fit(cifar_sets, tmp_path / "taught", _recipe(epochs=1, distill_weight=0.5), teacher=teacher)
    assert teacher.training
    assert all(p.requires_grad for p in teacher.parameters())
    assert _same(before, teacher.state_dict())
    student = _teacher()  # a student cut from the same teacher can still be trained, and learns
    _fit(cifar_sets, tmp_path / "next", _recipe(epochs=1, distill_weight=0.5), model=student, teacher=teacher)
    assert not _same(before, student.state_dict())
