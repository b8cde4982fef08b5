"""Independent checks for the tests: evaluation, MAC counts and exported-model outputs computed here, by hand,
not by the hrank functions under test."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch
from torch import nn


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch file written by ``tests.conftest.write_cifar`` (our own file: plain pickle is fine)."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    return np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d[b"labels"], dtype=np.int64)


def own_accuracy(model: nn.Module, images_uint8: np.ndarray, labels: np.ndarray, mean, std) -> tuple[float, float]:
    """Top-1 and top-5 (%) with a plain loop: [0, 1] scaling, (x - mean) / std, argmax / top-5 of the logits."""
    model = model.eval()
    x = torch.from_numpy(images_uint8).float() / 255.0
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    y = torch.from_numpy(labels)
    top1 = top5 = 0
    with torch.no_grad():
        for i in range(0, len(x), 7):  # a batch size hrank does not use
            out = model(x[i:i + 7])
            top1 += int((out.argmax(1) == y[i:i + 7]).sum())
            top5 += int((out.topk(5, 1).indices == y[i:i + 7, None]).any(1).sum())
    return 100.0 * top1 / len(x), 100.0 * top5 / len(x)


def hand_macs(model: nn.Module, input_size: tuple[int, ...] = (3, 32, 32)) -> int:
    """MACs of convs and linears from the layer shapes: k_h * k_w * (cin / groups) * cout * H_out * W_out per
    conv, in * out per linear. Output sizes are read with forward hooks (one forward pass, batch 1)."""
    total = 0

    def hook(m, _inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            kh, kw = m.kernel_size
            total += kh * kw * (m.in_channels // m.groups) * m.out_channels * out.shape[2] * out.shape[3]
        else:
            total += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_size))
    finally:
        for h in handles:
            h.remove()
    return total


def max_rel_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference over the largest |reference| value (at least 1)."""
    return float(np.abs(got - ref).max()) / max(1.0, float(np.abs(ref).max()))


def onnx_output(path: Path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
