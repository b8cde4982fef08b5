"""TorchScript and ONNX export, checked against PyTorch."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
import torch

from hrank import models
from hrank.errors import HRankError
from hrank.export import export_onnx, export_torchscript


def _trained_like(name: str = "resnet_20"):
    torch.manual_seed(0)
    model = models.create(name)
    # calibrate BN so that logits have a trained-like scale
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def test_onnx_export_matches_pytorch_with_dynamic_batch(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = _trained_like()
    check = export_onnx(model, tmp_path / "m.onnx")
    assert check.ok and check.max_abs_diff <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 3, 32, 32)
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.abs(got - model(x).numpy()).max() <= 1e-4


def test_onnx_export_of_remapped_shortcut(tmp_path):
    """The option-A shortcut with a non-contiguous channel map (as after pruning) survives export."""
    pytest.importorskip("onnxruntime")
    model = _trained_like()
    model.layer2[0].shortcut.set_mapping(16, 32, [0, 3, 5, 15], [1, 9, 20, 31])
    assert export_onnx(model, tmp_path / "m.onnx").ok


def test_torchscript_export_roundtrip(tmp_path):
    model = _trained_like().train()
    check = export_torchscript(model, tmp_path / "m.ts")
    assert check.ok and check.max_abs_diff == 0.0
    assert model.training  # mode restored
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_onnx_missing_dependency_is_a_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("no onnxruntime")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(HRankError, match=r"pip install 'hrank\[export\]'"):
        export_onnx(_trained_like(), tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
