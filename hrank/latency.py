"""Latency budgets: per-layer widths searched on latency measured on the deployment runtime, not on MACs.

Half the MACs is not half the time (docs/benchmarks.md). As NetAdapt does, every conv/linear layer is timed
alone, as deployed (BatchNorm folded, the runtime, batch size, layout and threads of the target), at each
(input width, output width) the search asks about; the table is cached per machine and setup. A network's
latency is predicted as the sum of its layers' times plus the rest of the dense model's measured time (ReLU,
additions, pooling, framework overhead) scaled with the activation volume. Each coupled group may stop only at
widths that are faster than every wider width of it (so the widths kernels run well come from the
measurement, not from a fixed multiple). The search then runs the budget search's bisection on the prediction,
prunes a copy physically, measures it end to end against the dense model in alternation, and corrects the
goal by the measured error, damped (``next_goal``), until the measured ratio is within the tolerance (or the
rounds are spent; the closest round that prunes something is kept and the report says how far off it is).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hrank import flops
from hrank.budget import BudgetResult
from hrank.errors import HRankError
from hrank.export import quiet_onnx_export
from hrank.io import _error_line, _first_line, atomic_write_json, check_writable
from hrank.modelcopy import copy_model

RUNTIMES = ("torch", "torchscript", "onnxruntime")
LAYOUTS = ("channels_last", "nchw")
TOLERANCE = 0.1  # measured latency within 10% of the target
ROUNDS = 4  # search + end-to-end measurement rounds at most
MAX_BATCH = 4096  # a latency batch beyond this is a typo (10**9 would only fail allocating the input)
MAX_THREADS = 1024  # torch accepts any thread count and would try to start them all


@dataclass(frozen=True)
class LatencySetup:
    """Where the pruned model will run: runtime, batch size, memory layout (torch), CPU threads, device."""

    runtime: str = "torch"
    batch_size: int = 1
    layout: str = "channels_last"
    threads: int | None = None  # None: the runtime's default (torch.get_num_threads())
    device: str = "cpu"
    repeats: int = 15  # timed runs per measurement (median)
    warmup: int = 3

    def check(self) -> LatencySetup:
        if self.runtime not in RUNTIMES:
            raise HRankError(f"unknown latency runtime {self.runtime!r}; choose {', '.join(RUNTIMES)}")
        if self.layout not in LAYOUTS:
            raise HRankError(f"unknown layout {self.layout!r}; choose {', '.join(LAYOUTS)}")
        if not _whole(self.batch_size) or not 1 <= self.batch_size <= MAX_BATCH:
            raise HRankError(f"latency batch size must be a whole number from 1 to {MAX_BATCH}, got "
                             f"{self.batch_size!r}")
        if self.threads is not None and (not _whole(self.threads) or not 1 <= self.threads <= MAX_THREADS):
            raise HRankError(f"latency threads must be a whole number from 1 to {MAX_THREADS}, got {self.threads!r}")
        if self.repeats < 1 or self.warmup < 0:
            raise HRankError("latency repeats must be >= 1 and warm-up >= 0")
        if self.runtime == "onnxruntime" and self.device != "cpu":
            raise HRankError("the onnxruntime latency runtime runs on the CPU; use --latency-runtime torch for CUDA")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise HRankError("latency on CUDA was asked for but no CUDA device is available")
        return self

    def identity(self) -> dict[str, Any]:
        """What a cached table depends on: the setup, the machine and the software that runs it."""
        ident: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("repeats", "warmup")}
        ident["threads"] = self.threads or torch.get_num_threads()
        ident.update(machine=platform.machine(), processor=platform.processor(), cpus=os.cpu_count(),
                     torch=torch.__version__)
        if self.runtime == "onnxruntime":
            import onnxruntime as ort

            ident["onnxruntime"] = ort.__version__
            ident["spinning"] = "stops after each run"  # tables timed before this change are not reused
        if self.device.startswith("cuda"):
            ident["gpu"] = torch.cuda.get_device_name(torch.device(self.device))
        return ident


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _cannot_run(runtime: str, module: nn.Module, e: Exception) -> HRankError:
    """The one-line error for a model the runtime cannot take (an export or a trace that fails)."""
    return HRankError(f"the {runtime} latency runtime cannot run {type(module).__name__} ({_error_line(e)}); "
                      f"measure on eager PyTorch instead (--latency-runtime torch)")


class Runtime(Protocol):
    """Prepares a module for timing: returns a callable that runs one forward pass to completion."""

    setup: LatencySetup

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[], None]: ...

    def times(self, run: Callable[[], None], repeats: int, warmup: int) -> list[float]: ...


class _Threads:
    """Run with ``n`` torch threads, restoring the previous number."""

    def __init__(self, n: int | None) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.old)


class _Timed:
    def times(self, run: Callable[[], None], repeats: int, warmup: int) -> list[float]:
        return time_runs(run, self.setup, repeats, warmup)


class TorchRuntime(_Timed):
    """Eager PyTorch in eval mode under ``inference_mode``, in the setup's layout; CUDA synchronised."""

    def __init__(self, setup: LatencySetup) -> None:
        self.setup = setup

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        dev = torch.device(self.setup.device)
        module = module.eval().to(dev)
        x = x.to(dev)
        if self.setup.layout == "channels_last" and x.dim() == 4:
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        forward = self._compiled(module, x)

        def run() -> None:
            with torch.inference_mode():
                forward(x)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        return run

    def _compiled(self, module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        """What runs the placed module: itself (eager)."""
        return module


class TorchScriptRuntime(TorchRuntime):
    """The module traced and frozen to TorchScript (what ``hrank.export.export_torchscript`` saves), run under
    ``inference_mode`` in the setup's layout: no Python per module, weights folded in as constants."""

    def _compiled(self, module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                frozen = torch.jit.freeze(torch.jit.trace(module, x).eval())
                with torch.inference_mode():
                    frozen(x)  # a graph that traces but does not run fails here, not in the timing
        except MemoryError:
            raise
        except Exception as e:  # outputs tracing cannot hold (a dict), data-dependent control flow, ...
            raise _cannot_run("torchscript", module, e) from None
        return frozen


class OnnxRuntime(_Timed):
    """The module exported to ONNX and run by onnxruntime on the CPU (all graph optimizations on)."""

    def __init__(self, setup: LatencySetup) -> None:
        try:
            import onnxruntime  # noqa: F401
        except Exception:
            raise HRankError("latency on onnxruntime needs onnx and onnxruntime: pip install 'hrank[export]'") \
                from None
        self.setup = setup

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        import onnxruntime as ort

        buf = io.BytesIO()
        feed = {"input": x.detach().cpu().numpy()}
        try:
            with torch.no_grad(), warnings.catch_warnings(), quiet_onnx_export():
                warnings.simplefilter("ignore")
                torch.onnx.export(module.eval().cpu(), (x.cpu(),), buf, dynamo=False, opset_version=17,
                                  input_names=["input"], output_names=["output"])
            sess = ort.InferenceSession(buf.getvalue(), ort_timing_options(self.setup.threads),
                                        providers=["CPUExecutionProvider"])
            sess.run(None, feed)  # a graph onnxruntime loads but cannot run fails here, not in the timing
        except MemoryError:
            raise
        except Exception as e:  # an op the exporter or onnxruntime does not support, an output it cannot hold
            raise _cannot_run("onnxruntime", module, e) from None
        return lambda: sess.run(None, feed)


def ort_timing_options(threads: int | None = None) -> Any:
    """onnxruntime session options for timing: all graph optimizations, ``threads`` intra-op threads (default
    torch's), and worker threads that stop spinning when a run ends. Without the last, a session's idle workers
    spin for tens of milliseconds after each run and take the cores of the next session timed in alternation
    (measured here: ResNet-56 at batch 1 on 2 cores, 1.77 ms alone, 3.0 ms alternated; 1.77 ms both ways with
    the stop). Spinning within a run is kept, as deployed."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def time_runs(run: Callable[[], None], setup: LatencySetup, repeats: int, warmup: int) -> list[float]:
    """Milliseconds of ``repeats`` timed calls of ``run`` after ``warmup`` untimed ones, with the setup's
    torch threads."""
    out: list[float] = []
    with _Threads(setup.threads):
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            out.append((time.perf_counter() - t0) * 1e3)
    return out


def make_runtime(setup: LatencySetup) -> TorchRuntime | OnnxRuntime:
    setup.check()
    return {"torch": TorchRuntime, "torchscript": TorchScriptRuntime, "onnxruntime": OnnxRuntime}[setup.runtime](setup)


# -- the per-layer table --------------------------------------------------------------------------------------

def check_cache_dir(cache_dir: str | os.PathLike, *, out: str | os.PathLike | None = None) -> Path:
    """The latency cache folder, checked before any timing: a folder (or creatable), writable, and not inside
    ``out`` (an output directory that is replaced when the command writes it)."""
    path = Path(cache_dir).expanduser()
    if out is not None:
        where, inside = path.resolve(), Path(out).expanduser().resolve()
        if where == inside or inside in where.parents:
            raise HRankError(f"the latency cache {path} is inside the output directory {out}, which is replaced "
                             f"when the output is written; choose a cache folder outside it (--latency-cache)")
    if path.exists() and not path.is_dir():
        raise HRankError(f"the latency cache {path} is a file, expected a folder (--latency-cache)")
    check_writable(path, "latency cache")
    return path


def _valid_ms(value: Any) -> bool:
    """A time a measurement can give: a finite, positive number of milliseconds."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        value = float(value)
    except OverflowError:  # an integer too large for a float
        return False
    return math.isfinite(value) and value > 0

def _resized(m: nn.Module, cin: int, cout: int) -> nn.Module:
    """A layer like ``m`` with ``cin`` inputs and ``cout`` outputs, with a bias (BatchNorm folded into it)."""
    if isinstance(m, nn.Linear):
        return nn.Linear(cin, cout)
    if isinstance(m, nn.modules.conv._ConvNd):
        depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
        groups = cout if depthwise else m.groups
        if not depthwise and (cin % groups or cout % groups):
            groups = int(np.gcd(cin, cout))
        kw = dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, dilation=m.dilation,
                  groups=groups, bias=True, padding_mode=m.padding_mode)
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            return type(m)(cin, cout, output_padding=m.output_padding, **kw)
        return type(m)(cin, cout, **kw)
    raise HRankError(f"no latency table for a {type(m).__name__} layer")


@dataclass
class LayerTable:
    """Milliseconds of single layers at given widths, measured on demand and kept (and cached on disk)."""

    setup: LatencySetup
    runtime: Runtime
    path: Path | None = None
    entries: dict[str, float] = field(default_factory=dict)
    measured: int = 0  # measurements made in this process (the rest came from the cache)

    @classmethod
    def open(cls, setup: LatencySetup, cache_dir: str | os.PathLike | None = None,
             runtime: Runtime | None = None, warn: Callable[[str], None] | None = None) -> LayerTable:
        """A table for ``setup``; with ``cache_dir`` (checked writable first), loaded from (and later saved to)
        the file for this setup and machine. A damaged file, or entries that are not finite positive times, are
        measured again and never trusted; ``warn`` (default: ``warnings.warn``) is told so in one line."""
        runtime = runtime or make_runtime(setup)
        path = None
        if cache_dir is not None:
            ident = json.dumps(setup.identity(), sort_keys=True)
            path = check_cache_dir(cache_dir) / f"latency-{hashlib.sha256(ident.encode()).hexdigest()[:16]}.json"
        table = cls(setup, runtime, path)
        if path is not None and path.exists():
            table.entries, problem = _read_cache(path, setup.identity())
            if problem:
                _tell(warn, f"latency cache {path}: {problem}; measuring again")
        return table

    def save(self, warn: Callable[[str], None] | None = None) -> None:
        """Write the table to its cache file; a file system that refuses (full, read-only) costs the cache only,
        not the search, and ``warn`` is told."""
        if self.path is not None:
            try:
                atomic_write_json(self.path, {"identity": self.setup.identity(), "entries": self.entries})
            except OSError as e:
                _tell(warn, f"latency cache {self.path} not saved ({e.strerror or e}); its timings are measured "
                            f"again next time")

    def layer_ms(self, m: nn.Module, in_shape: Sequence[int], cin: int, cout: int) -> float:
        """Milliseconds of a layer like ``m`` reading ``cin`` channels and writing ``cout``, on an input of
        ``in_shape`` (one sample; the batch is the setup's)."""
        spatial = tuple(int(d) for d in in_shape[1:]) if not isinstance(m, nn.Linear) else \
            tuple(int(d) for d in in_shape[:-1])
        key = f"{type(m).__name__}|{m!r}|{spatial}|{cin}x{cout}"
        if key not in self.entries:
            layer = _resized(m, cin, cout)
            shape = (self.setup.batch_size, cin, *spatial) if not isinstance(m, nn.Linear) else \
                (self.setup.batch_size, *spatial, cin)
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            run = self.runtime.prepare(layer, x)
            ms = statistics.median(self.runtime.times(run, self.setup.repeats, self.setup.warmup))
            if not _valid_ms(ms):
                raise HRankError(f"the {self.setup.runtime} runtime timed a {type(m).__name__} layer at {ms!r} ms; "
                                 f"a time must be finite and positive (is the clock or the runtime broken?)")
            self.entries[key] = float(ms)
            self.measured += 1
        return self.entries[key]


def _tell(warn: Callable[[str], None] | None, message: str) -> None:
    """``warn(message)``, or a Python warning attributed to the caller of the table method that warns."""
    if warn is not None:
        warn(message)
    else:
        warnings.warn(message, stacklevel=3)


def _read_cache(path: Path, identity: dict[str, Any]) -> tuple[dict[str, float], str]:
    """The valid entries of a cache file for ``identity``, and what was wrong with the rest ('' if nothing)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: not JSON, not UTF-8
        return {}, f"unreadable ({_first_line(e)})"
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {}, "not a latency table (no mapping of timings under 'entries')"
    if data.get("identity") != identity:
        return {}, ""  # another setup's table under a clashing name: not ours, not damaged
    entries = {k: float(v) for k, v in data["entries"].items() if _valid_ms(v)}
    bad = len(data["entries"]) - len(entries)
    return entries, f"{bad} of {len(data['entries'])} timings are not finite positive numbers" if bad else ""


class LatencyModel:
    """Predicted latency of the physically pruned network as a function of channels removed per group."""

    def __init__(self, model: nn.Module, cost: Any, input_size: tuple[int, ...], table: LayerTable,
                 dense_ms: float) -> None:
        from hrank.flops import _trace_layers

        self.cost, self.table = cost, table
        self.calls = [(m, tuple(in_shape[1:]), tuple(out_shape[1:]))
                      for _, m, in_shape, out_shape in _trace_layers(model, input_size)]
        if len(self.calls) != len(cost.layers):
            raise HRankError("internal: the latency model and the cost model see different layers")
        self.dense_ms = dense_ms
        dense = [0] * len(cost.effects)
        self.layers_dense = self._layers_ms(dense)
        self.act_dense = self._activations(dense)
        self.rest_ms = dense_ms - self.layers_dense  # ReLU, additions, pooling, per-op overhead
        self.scale = 1.0 if self.rest_ms >= 0 else dense_ms / self.layers_dense
        # the rest as fixed + per-activation: all per-activation until a second network is measured (calibrate)
        self.fixed_ms, self.per_act_ms = 0.0, max(self.rest_ms, 0.0) / max(self.act_dense, 1.0)

    def calibrate(self, counts: Sequence[int], measured_ms: float) -> None:
        """Split the rest into a fixed part (per-op overhead, which pruning does not shrink) and a part that
        scales with the activations, from a second network (``counts`` removed) measured at ``measured_ms``."""
        if self.rest_ms < 0:
            return
        act, rest = self._activations(counts), measured_ms - self._layers_ms(counts)
        if self.act_dense - act <= 0:
            return
        per_act = (self.rest_ms - rest) / (self.act_dense - act)
        per_act = min(max(per_act, 0.0), self.rest_ms / max(self.act_dense, 1.0))
        self.per_act_ms, self.fixed_ms = per_act, self.rest_ms - per_act * self.act_dense

    def widths(self, counts: Sequence[int]) -> list[tuple[int, int]]:
        """(input channels, output channels) of every layer call after removing ``counts`` per group (a
        depthwise conv reads as many channels as it writes)."""
        return [(width_out if depthwise else width_in, width_out)
                for (*_, depthwise, _), (width_in, width_out) in zip(self.cost.layers, self.cost.widths(counts),
                                                                     strict=True)]

    def _layers_ms(self, counts: Sequence[int]) -> float:
        return sum(self.table.layer_ms(m, in_shape, cin, cout)
                   for (m, in_shape, _), (cin, cout) in zip(self.calls, self.widths(counts), strict=True))

    def _activations(self, counts: Sequence[int]) -> float:
        return float(sum(cout * int(np.prod(out_shape[1:])) if len(out_shape) > 1 else cout
                         for (_, _, out_shape), (_, cout) in zip(self.calls, self.widths(counts), strict=True)))

    def __call__(self, counts: Sequence[int]) -> float:
        layers = self._layers_ms(counts)
        if self.rest_ms < 0:
            return layers * self.scale
        return layers + self.fixed_ms + self.per_act_ms * self._activations(counts)


def deployed(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """A copy of the model as it runs when deployed: BatchNorm folded where the fold is exact (a model torch.fx
    cannot trace is copied unfolded). The caller's model is not changed."""
    from hrank.fold import fold_batchnorm

    try:
        return fold_batchnorm(model, example).model
    except HRankError:
        return copy_model(model).eval()


def compare_end_to_end(runs: Mapping[str, Callable[[], None]], runtime: Runtime, *,
                       rounds: int = 5) -> dict[str, float]:
    """Median milliseconds of each prepared run (``runtime.prepare``), timed in alternation over ``rounds``
    (a change of the machine's load hits every model alike)."""
    per_round = max(1, runtime.setup.repeats // rounds)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(rounds):
        for name, run in runs.items():
            samples[name] += runtime.times(run, per_round, runtime.setup.warmup if i == 0 else 1)
    return {name: statistics.median(v) for name, v in samples.items()}


@dataclass
class LatencyBudgetResult:
    """The spec found for a latency target, and what the pruned network measures against the dense one."""

    spec: Any  # hrank.spec.Spec
    target: float  # fraction of the dense latency asked for
    measured: float  # measured fraction (pruned / dense median, timed in alternation)
    dense_ms: float
    pruned_ms: float
    predicted_ms: float
    macs: int
    params: int
    dense_macs: int
    rounds: int
    setup: LatencySetup
    group_pruned: dict[str, int] = field(default_factory=dict)
    table_measured: int = 0
    table_size: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    fixed_ms: float = 0.0  # the prediction's time outside the layers that pruning does not shrink

    metric = "latency"

    @property
    def error(self) -> float:
        return abs(self.measured - self.target) / self.target

    def describe(self) -> str:
        s = self.setup
        return (f"{self.pruned_ms:.2f} ms vs {self.dense_ms:.2f} ms dense = {self.measured:.1%} of the dense "
                f"latency (target {self.target:.0%}, off by {self.error:.1%}; {s.runtime}, batch {s.batch_size}"
                f"{', ' + s.layout if s.runtime == 'torch' else ''}), {flops.format_count(self.macs)} MACs "
                f"({self.macs / self.dense_macs:.1%})")

    hrank_string = BudgetResult.hrank_string  # the spec in HRank's list syntax, or None

    def to_json(self) -> dict[str, Any]:
        return {"metric": "latency", "target": self.target, "measured": self.measured, "error": self.error,
                "dense_ms": self.dense_ms, "pruned_ms": self.pruned_ms, "predicted_ms": self.predicted_ms,
                "macs": self.macs, "params": self.params, "dense_macs": self.dense_macs, "rounds": self.rounds,
                "setup": asdict(self.setup), "table_measured": self.table_measured, "table_size": self.table_size,
                "history": self.history, "fixed_ms": self.fixed_ms, "compress_rate": self.hrank_string(),
                "rates": dict(self.spec.rates)}


PROBED_WIDTHS = 64  # a group is timed at about this many widths at most (every one up to 64 channels)


def _record_steps(model_ms: Callable[[list[int]], float], n_groups: int, gi: int, limit: int, blocks: int,
                  dense_ms: float, channels: int) -> list[int]:
    """The cuts of group ``gi`` (others whole) that are faster than every smaller cut: the widths worth
    stopping at, as measured. Wide groups are probed every ``channels / PROBED_WIDTHS`` channels (a multiple
    of ``blocks``), which bounds the layer timings of a ResNet-50-sized model."""
    best, steps = dense_ms, []
    stride = blocks * max(1, -(-channels // (PROBED_WIDTHS * blocks)))
    for k in range(stride, limit + 1, stride):
        counts = [0] * n_groups
        counts[gi] = k
        ms = model_ms(counts)
        if ms < best:
            best = ms
            steps.append(k)
    return steps


def check_target(target: Any) -> float:
    """A latency target as a fraction in (0, 1) of the dense latency, or a one-line error."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise HRankError(f"a latency target is a fraction of the dense latency, got {target!r}") from None
    if not 0 < value < 1:
        raise HRankError(f"a latency target is a fraction of the dense latency in (0, 1), got {target!r}")
    return value


def next_goal(goal: float, correction: float, dense_ms: float) -> float:
    """The next round's predicted-time goal: ``goal`` corrected by the measured error (target / measured ratio),
    at most 2x either way per round, and rising at most half-way to the dense network's time, so one noisy
    end-to-end measurement cannot send the search to a goal the unpruned network already meets."""
    step = min(max(correction, 0.5), 2.0)
    return min(goal * step, (goal + dense_ms) / 2) if step > 1 else goal * step


def find_latency_budget(model: nn.Module, scores: Mapping[str, np.ndarray] | object, *, target: float,
                        setup: LatencySetup | None = None, input_size: tuple[int, ...] | None = None,
                        example_input: torch.Tensor | None = None, convs: Sequence[str] | None = None,
                        max_rate: float = 0.9, tolerance: float = TOLERANCE, order: str = "coupled",
                        ignore: Sequence[str] | str | None = None, cache_dir: str | os.PathLike | None = None,
                        rounds: int = ROUNDS, runtime: Runtime | None = None,
                        progress: Callable[[str], None] | None = None) -> LatencyBudgetResult:
    """Rates whose physically pruned, deployed network runs in ``target`` x the dense model's latency.

    ``target`` is a fraction in (0, 1) of the dense latency measured with ``setup`` (runtime, batch, layout,
    threads). ``scores``, ``convs``, ``max_rate``, ``order`` and ``ignore`` are as in
    :func:`hrank.budget.find_budget`. The per-layer table is cached in ``cache_dir`` (per machine and setup).
    Returns the closest of at most ``rounds`` search-and-measure rounds; its ``measured`` ratio is a real
    end-to-end measurement, and the result says how far it is from the target.
    """
    from hrank.budget import _CostModel, _prepare, _search

    target = check_target(target)
    if not 0 < tolerance < 1:
        raise HRankError(f"tolerance must be in (0, 1), got {tolerance!r}")
    setup = (setup or LatencySetup()).check()
    search = _prepare(model, scores, input_size=input_size, example_input=example_input, convs=convs,
                      max_rate=max_rate, order=order, ignore=ignore)
    say = progress or (lambda _: None)
    warn = (lambda m: say(f"warning: {m}")) if progress else None
    table = LayerTable.open(setup, cache_dir, runtime, warn=warn)
    x = torch.randn(setup.batch_size, *search.input_size, generator=torch.Generator().manual_seed(0))
    # the dense model is prepared once (an ONNX export for onnxruntime) and timed beside every candidate
    dense_run = table.runtime.prepare(deployed(model, x[:1].to(next(model.parameters()).device)).cpu(), x)
    dense_ms = compare_end_to_end({"dense": dense_run}, table.runtime)["dense"]
    cost = _CostModel(model, search.graph, search.prunable, search.input_size)
    predict = LatencyModel(model, cost, search.input_size, table, dense_ms)
    say(f"dense model: {dense_ms:.3f} ms at batch {setup.batch_size} on {setup.runtime}; measuring layer widths")
    dense_pred = predict([0] * len(search.prunable))
    steps = [_record_steps(predict, len(search.prunable), gi, lim, g.blocks, dense_pred, g.channels)
             for gi, (g, lim) in enumerate(zip(search.prunable, search.limits, strict=True))]
    limits = [max(s, default=0) for s in steps]
    # a second network, every group at about half its allowed cut, measured against the dense one: splits the
    # time outside the layers into per-op overhead and activation traffic
    half = [s[len(s) // 2] if s else 0 for s in steps]
    if any(half):
        _, half_model = search.prune(model, half)
        half_run = table.runtime.prepare(deployed(half_model.cpu(), x[:1]), x)
        both = compare_end_to_end({"dense": dense_run, "half": half_run}, table.runtime)
        predict.calibrate(half, both["half"] * dense_ms / both["dense"])
    table.save(warn)
    floor = predict(limits)
    if floor > target * dense_ms * (1 + tolerance):
        raise HRankError(f"latency target {target:.0%} cannot be met with max_rate {max_rate:g}: the smallest "
                         f"network is predicted at {floor / dense_ms:.0%} of the dense latency")
    goal = target * dense_ms
    ratios = cost.params_per_mac()  # a property of the network, the same in every round
    best: tuple[float, Any] | None = None
    history: list[dict[str, float]] = []
    for r in range(1, rounds + 1):
        counts, predicted = _search(search.prunable, search.raw, limits, order, predict, goal, 0.01,
                                    group_steps=steps, params_per_mac=ratios)
        spec, pruned = search.prune(model, counts)
        pruned_run = table.runtime.prepare(deployed(pruned.cpu(), x[:1]), x)
        measured = compare_end_to_end({"dense": dense_run, "pruned": pruned_run}, table.runtime)
        ratio = measured["pruned"] / measured["dense"]
        history.append({"goal_ms": goal, "predicted_ms": predicted, "dense_ms": measured["dense"],
                        "pruned_ms": measured["pruned"], "ratio": ratio})
        say(f"round {r}: predicted {predicted / dense_ms:.1%}, measured {ratio:.1%} of the dense latency")
        # the unpruned network (no counts) is never an answer, whatever noise measured it at
        if any(counts) and (best is None or abs(ratio - target) < abs(best[0] - target)):
            best = (ratio, (counts, spec, pruned, measured, predicted, r))
            if abs(ratio - target) <= tolerance * target:
                break
        goal = next_goal(goal, target / ratio, dense_ms)
    table.save(warn)
    if best is None:  # every round's search kept the whole network: narrower widths never measured faster
        raise HRankError(f"latency target {target:.0%} not found: no narrower width measured faster than the dense "
                         f"model on {setup.runtime} at batch {setup.batch_size} (the measurements are too noisy "
                         f"or the runtime's overhead dominates); try a larger batch, or a quieter machine")
    ratio, (counts, spec, pruned, measured, predicted, r) = best
    real = flops.count(pruned, search.input_size)
    dense_macs = flops.count(model, search.input_size).macs
    return LatencyBudgetResult(spec, target, ratio, measured["dense"], measured["pruned"], predicted, real.macs,
                               real.params, dense_macs, r, setup,
                               {g.members[0]: n for g, n in zip(search.prunable, counts, strict=True)},
                               table.measured, len(table.entries), history, predict.fixed_ms)
