"""Measured inference latency and on-disk size, reported beside MACs (which do not always predict speed)."""

from __future__ import annotations

import io
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Latency:
    """Median and spread of per-batch forward times (milliseconds) over timed repeats after warm-up."""

    batch_size: int
    device: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / (self.median_ms / 1000.0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(model: nn.Module, input_size: tuple[int, ...], batch_size: int = 1, *,
                    device: torch.device | str | None = None, warmup: int = 3, repeats: int = 10,
                    min_time_s: float = 0.0, channels_last: bool = False) -> Latency:
    """Time ``model`` in eval mode under ``inference_mode`` on random input; restores the training mode.

    At least ``repeats`` timed runs (more until ``min_time_s`` has passed); CUDA is synchronised around
    every run so the numbers are wall-clock latency, not launch time.
    """
    p = next(model.parameters())
    device = torch.device(device) if device is not None else p.device
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_size, device=device, dtype=p.dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            _sync(device)
            start_all = time.perf_counter()
            while len(times) < repeats or time.perf_counter() - start_all < min_time_s:
                t0 = time.perf_counter()
                model(x)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1000.0)
    finally:
        model.train(was_training)
    return summarise_latency(times, batch_size, str(device))


def compare_latency(named: dict[str, nn.Module], input_size: tuple[int, ...], batch_size: int, *,
                    device: torch.device | str, rounds: int = 3, repeats: int = 5, warmup: int = 1,
                    channels_last: bool = False) -> dict[str, Latency]:
    """Latency of several models measured in alternation (``rounds`` x ``repeats`` timed runs each), so
    that a machine whose load changes over time biases none of them; returns each model's statistics."""
    samples: dict[str, list[float]] = {name: [] for name in named}
    for _ in range(rounds):
        for name, model in named.items():
            samples[name] += measure_latency(model, input_size, batch_size, device=device, warmup=warmup,
                                             repeats=repeats, channels_last=channels_last).samples_ms
    return {name: summarise_latency(times, batch_size, str(device)) for name, times in samples.items()}


def summarise_latency(times: list[float], batch_size: int, device: str) -> Latency:
    """Median and p10/p90 (inclusive quantiles: never outside the samples) of latencies in milliseconds."""
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return Latency(batch_size, device, statistics.median(times), q[0], q[-1], len(times), list(times))


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's weights as ``torch.save`` writes them (what a checkpoint costs on disk)."""
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getbuffer().nbytes
