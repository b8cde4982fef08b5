"""Export a (pruned) model to TorchScript and ONNX in its deployment form, checked against PyTorch.

Deployment form: BatchNorm folded into the conv before it (``hrank.fold`` for TorchScript; onnxruntime's
offline optimizer at its portable "basic" level for ONNX, which folds it and drops constant subgraphs). Both
files are reloaded and compared with the PyTorch model on a random batch."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hrank.errors import HRankError
from hrank.io import atomic_save_with
from hrank.modelcopy import copy_model

ONNX_ATOL = 1e-4


@dataclass
class ExportCheck:
    """Outcome of comparing an exported model with PyTorch on the same random input."""

    path: str
    max_abs_diff: float
    output_scale: float  # max |logit| of the PyTorch output, to read the difference against
    ok: bool
    batchnorm_left: int | None = None  # BatchNorm ops left in the saved model (None: not counted)
    note: str = ""  # why the deployment form was not reached (e.g. the model cannot be traced to fold BN)


def _example(model: nn.Module, input_size: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    p = next(model.parameters())
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *input_size, generator=g).to(p.device, p.dtype)


def _tolerance(scale: float, atol: float) -> float:
    # 1e-4 absolute on trained models (logits of order 10); relative for untrained nets with huge logits
    return atol * max(1.0, scale / 10.0)


def export_torchscript(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...] = (3, 32, 32),
                       *, seed: int = 0, atol: float = ONNX_ATOL, fold_bn: bool = True,
                       freeze: bool = True) -> ExportCheck:
    """Trace ``model`` (eval mode; BatchNorm folded when ``fold_bn``) to TorchScript at ``path``, reload it and
    compare its outputs with ``model``'s. A model torch.fx cannot trace is exported unfolded, with a note.

    With ``freeze`` the module is frozen (``torch.jit.freeze``: weights inlined as constants, attributes gone),
    the inference form the ``torchscript`` latency runtime measures; a module that cannot be frozen is saved
    traced, with a note."""
    from hrank.fold import fold_batchnorm

    was_training = model.training
    model.eval()
    note, target = "", model
    try:
        x = _example(model, input_size, 2, seed)
        if fold_bn:
            try:
                target = fold_batchnorm(model, x).model
            except HRankError as e:
                note = f"BatchNorm not folded: {e}"
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(target, x)
            if freeze:
                try:
                    traced = torch.jit.freeze(traced.eval())
                except Exception as e:
                    note = "; ".join(filter(None, [note, f"not frozen: {type(e).__name__}: "
                                                         f"{str(e).splitlines()[0][:120]}"]))
            atomic_save_with(path, lambda tmp: torch.jit.save(traced, tmp))
            loaded = torch.jit.load(str(path), map_location=x.device)
            x2 = _example(model, input_size, 3, seed + 1)
            ref, got = model(x2), loaded(x2)
            left = str(loaded.inlined_graph).count("aten::batch_norm(")  # in what the file runs
    except Exception as e:
        raise HRankError(f"TorchScript export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        model.train(was_training)
    diff = float((ref - got).abs().max())
    scale = float(ref.abs().max())
    check = ExportCheck(str(path), diff, scale, diff <= _tolerance(scale, atol), left, note)
    if not check.ok:
        Path(path).unlink(missing_ok=True)
        raise HRankError(f"TorchScript output differs from PyTorch by {diff:.2e} (> {atol:g}); file not kept")
    return check


@contextlib.contextmanager
def quiet_onnx_export() -> Iterator[None]:
    """Silence stdout, file descriptor 1 included, around a TorchScript ONNX export: when an export fails, torch
    writes the whole graph there from C++ (100+ lines before the one-line error hrank gives). The exporter also
    leaves its C++ log switched on (it reads the switch's function, not its value); the switch is restored."""
    log_was = torch._C._jit_is_onnx_log_enabled()
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError, AttributeError):  # no real stdout (closed, or not a file): Python's only
        saved = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            if saved is None:
                yield
            else:
                with open(os.devnull, "wb") as null:
                    os.dup2(null.fileno(), 1)
                yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)
        torch._C._jit_set_onnx_log_enabled(log_was)


def export_onnx(model: nn.Module, path: str | os.PathLike, input_size: tuple[int, ...] = (3, 32, 32), *,
                seed: int = 0, atol: float = ONNX_ATOL, opset: int = 17, optimize: bool = True) -> ExportCheck:
    """Export to ONNX with a dynamic batch axis and check it with onnxruntime on random input.

    With ``optimize`` the file saved is the graph after onnxruntime's basic offline optimizations (BatchNorm
    folded into convs, constants folded, no hardware-specific ops: it loads in any ONNX runtime).

    Raises HRankError when onnx/onnxruntime are missing (``pip install 'hrank[export]'``), when the export
    fails, or when the largest absolute difference to PyTorch exceeds ``atol`` (scaled for huge logits).
    """
    try:
        import onnx
        import onnxruntime as ort
    except Exception:
        raise HRankError("ONNX export needs onnx and onnxruntime: pip install 'hrank[export]'") from None
    was_training = model.training
    model.eval()
    cpu_model = model
    try:
        x = _example(model, input_size, 2, seed).cpu().float()
        param = next(model.parameters())
        if param.device.type != "cpu" or param.dtype != torch.float32:
            cpu_model = copy_model(model).cpu().float()

        def export_to(file: str) -> None:
            with warnings.catch_warnings(), quiet_onnx_export():
                warnings.simplefilter("ignore")
                torch.onnx.export(cpu_model, (x,), file, dynamo=False, opset_version=opset,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})

        def write(tmp: str) -> None:
            if not optimize:
                export_to(tmp)
                return
            raw = tmp + ".raw.onnx"
            try:
                export_to(raw)
                opts = ort.SessionOptions()
                opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                opts.optimized_model_filepath = tmp
                ort.InferenceSession(raw, opts, providers=["CPUExecutionProvider"])
            finally:
                Path(raw).unlink(missing_ok=True)

        atomic_save_with(path, write)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        x2 = _example(cpu_model, input_size, 3, seed + 1)
        with torch.no_grad():
            ref = cpu_model(x2).numpy()
        got = session.run(None, {"input": x2.numpy()})[0]
    except HRankError:
        raise
    except Exception as e:
        raise HRankError(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    finally:
        model.train(was_training)
    diff = float(np.abs(ref - got).max())
    scale = float(np.abs(ref).max())
    left = sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    check = ExportCheck(str(path), diff, scale, diff <= _tolerance(scale, atol), left)
    if not check.ok:
        Path(path).unlink(missing_ok=True)
        raise HRankError(f"ONNX output differs from PyTorch by {diff:.2e} (> {atol:g}); file not kept")
    return check


@dataclass(frozen=True)
class Exporter:
    """One registered export format: the file it writes (in a run directory) and the function writing it."""

    name: str
    filename: str
    export: Callable[..., ExportCheck]  # (model, path, input_size) -> ExportCheck


_REGISTRY: dict[str, Exporter] = {}


def register(exporter: Exporter) -> Exporter:
    """Make an export format available to ``hrank run``'s ``export`` key."""
    _REGISTRY[exporter.name] = exporter
    return exporter


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Exporter:
    if name not in _REGISTRY:
        raise HRankError(f"unknown export format {name!r}; choose from {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


register(Exporter("onnx", "model.onnx", export_onnx))
register(Exporter("torchscript", "model.torchscript.pt", export_torchscript))
