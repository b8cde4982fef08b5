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
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    # the reported difference is the real one, on the check's documented input (seed + 1, batch 3)
    x_check = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_check = model(x_check).numpy()
    ours = float(np.abs(session.run(None, {"input": x_check.numpy()})[0] - ref_check).max())
    assert check.max_abs_diff == pytest.approx(ours, rel=1e-6, abs=1e-12)
    assert check.output_scale == pytest.approx(float(np.abs(ref_check).max()), rel=1e-6)
    # and on an input of our own, at another batch size (the batch axis is dynamic)
    x = torch.randn(7, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    got = session.run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (7, 10)
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_onnx_export_of_remapped_shortcut(tmp_path):
    """The option-A shortcut with a non-contiguous channel map (as after pruning) survives export."""
    pytest.importorskip("onnxruntime")
    import onnxruntime as ort

    model = _trained_like()
    model.layer2[0].shortcut.set_mapping(16, 32, [0, 3, 5, 15], [1, 9, 20, 31])
    export_onnx(model, tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x).numpy()
    got = session.run(None, {"input": x.numpy()})[0]
    assert np.abs(got - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))
    # the remapped shortcut matters: the same model with the identity map computes something else
    other = _trained_like()
    with torch.no_grad():
        assert np.abs(other(x).numpy() - ref).max() > 1e-2


def test_torchscript_export_roundtrip(tmp_path):
    model = _trained_like().train()
    check = export_torchscript(model, tmp_path / "m.ts", fold_bn=False, freeze=False)
    assert check.max_abs_diff == 0.0  # the traced graph runs the same kernels: bit-identical outputs
    assert check.batchnorm_left == 19 and check.note == ""
    assert model.training  # mode restored
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_torchscript_export_folds_batchnorm_by_default(tmp_path):
    model = _trained_like().train()
    check = export_torchscript(model, tmp_path / "m.ts")
    assert check.batchnorm_left == 0 and check.note == ""
    assert model.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 19
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    assert "batch_norm" not in str(loaded.inlined_graph)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        ref, got = model(x), loaded(x)
    assert not torch.equal(ref, got)  # other arithmetic (folded weights) ...
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))  # ... same function


def test_torchscript_export_is_frozen_by_default(tmp_path):
    model = _trained_like()
    check = export_torchscript(model, tmp_path / "m.ts", fold_bn=False)  # freezing folds BatchNorm by itself
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    assert list(loaded.parameters()) == []  # weights are constants of the graph
    assert check.batchnorm_left == 0 and check.note == ""
    traced = export_torchscript(model, tmp_path / "t.ts", fold_bn=False, freeze=False)
    assert len(list(torch.jit.load(str(tmp_path / "t.ts")).parameters())) == len(list(model.parameters()))
    assert traced.batchnorm_left == 19
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref, got = model.eval()(x), loaded(x)
    assert float((got - ref).abs().max()) <= 1e-4 * max(1.0, float(ref.abs().max()))


def test_onnx_export_saves_the_optimized_graph_without_batchnorm(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    model = _trained_like()
    folded = export_onnx(model, tmp_path / "opt.onnx")
    plain = export_onnx(model, tmp_path / "plain.onnx", optimize=False)
    ops = {name: [n.op_type for n in onnx.load(str(tmp_path / name)).graph.node] for name in ("opt.onnx", "plain.onnx")}
    # torch's exporter folds BatchNorm into the convs in eval mode; the count is of the saved graph
    assert ops["plain.onnx"].count("BatchNormalization") == plain.batchnorm_left == 0
    assert ops["opt.onnx"].count("BatchNormalization") == folded.batchnorm_left == 0
    assert ops["opt.onnx"].count("Conv") == ops["plain.onnx"].count("Conv") == 19
    # onnxruntime's offline pass folded the constant subgraphs (shape arithmetic of the option-A shortcut)
    assert "Constant" in ops["plain.onnx"] and "Constant" not in ops["opt.onnx"]
    assert len(ops["opt.onnx"]) < len(ops["plain.onnx"])
    assert folded.ok and folded.max_abs_diff <= 1e-4 * max(1.0, folded.output_scale)
    assert not list(tmp_path.glob("*.raw.onnx"))  # the unoptimized intermediate is not left behind


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


def test_failed_onnx_export_is_one_line_with_nothing_on_stdout(tmp_path, capfd):
    """The TorchScript exporter writes the whole graph to file descriptor 1 from C++ when an export fails, and
    leaves its C++ log switched on: hrank silences the first and restores the second."""
    pytest.importorskip("onnxruntime")
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.AdaptiveAvgPool2d(3),
                                torch.nn.Flatten(), torch.nn.Linear(36, 10))  # 3 does not divide 8: unsupported
    log_before = torch._C._jit_is_onnx_log_enabled()
    with pytest.raises(HRankError, match="ONNX export failed") as err:
        export_onnx(model, tmp_path / "m.onnx", (3, 8, 8))
    out, _ = capfd.readouterr()
    assert "graph" not in out and out == ""
    assert "\n" not in str(err.value)
    assert torch._C._jit_is_onnx_log_enabled() == log_before
    assert not (tmp_path / "m.onnx").exists()
    print("still printed")  # stdout works again after the export
    assert capfd.readouterr().out == "still printed\n"
