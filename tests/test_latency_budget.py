"""Latency budgets (hrank.latency): the search on a runtime whose times are known, the cache, the errors."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hrank import flops, models
from hrank.criteria import l1_scores
from hrank.errors import HRankError
from hrank.latency import LatencySetup, find_latency_budget
from hrank.plan import make_plan
from hrank.prune import apply_plan

OVERHEAD_MS = 0.3  # the whole network's fixed cost (not in any layer)


def _layer_ms(layer: flops.LayerCount, batch: int) -> float:
    # a made-up but deterministic device: time grows with the MACs, widths that are not multiples of 4 run
    # 1.6x slower (as narrow odd widths do on real kernels), and every layer call costs 0.02 ms
    slow = 1.6 if layer.out_channels % 4 else 1.0
    return batch * layer.macs * 2e-6 * slow + 0.02


def _model_ms(module: nn.Module, x: torch.Tensor) -> float:
    layers = flops.count(module, tuple(x.shape[1:])).layers
    single = isinstance(module, (nn.Conv2d, nn.Linear))
    return sum(_layer_ms(layer, x.shape[0]) for layer in layers) + (0.0 if single else OVERHEAD_MS)


class FakeRuntime:
    """A runtime whose times are computed, not measured: the search's logic is tested exactly."""

    def __init__(self, setup: LatencySetup) -> None:
        self.setup = setup
        self.prepared = 0

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        self.prepared += 1
        ms = _model_ms(module, x)

        def run() -> None:
            return None
        run.ms = ms  # type: ignore[attr-defined]
        return run

    def times(self, run: Callable[[], None], repeats: int, warmup: int) -> list[float]:
        return [run.ms] * repeats  # type: ignore[attr-defined]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return models.create("resnet_20").eval()


def _search(net: nn.Module, target: float, tmp_path, **kw):
    setup = LatencySetup(batch_size=2, repeats=3, warmup=0)
    runtime = FakeRuntime(setup)
    return find_latency_budget(net, l1_scores(net), target=target, setup=setup, runtime=runtime,
                               cache_dir=tmp_path, **kw), runtime


def test_the_measured_latency_meets_the_target_and_is_the_real_ratio(tmp_path):
    net = _net()
    before = copy.deepcopy(net.state_dict())
    res, _ = _search(net, 0.5, tmp_path)
    assert abs(res.measured - 0.5) <= 0.1 * 0.5
    # the reported ratio is the pruned network's own (recomputed here from the spec, independently)
    pruned = apply_plan(copy.deepcopy(net), make_plan(net, l1_scores(net), res.spec), mode="physical")
    x = torch.zeros(2, 3, 32, 32)
    assert res.dense_ms == pytest.approx(_model_ms(net, x))
    assert res.pruned_ms == pytest.approx(_model_ms(pruned, x))
    assert res.measured == pytest.approx(_model_ms(pruned, x) / _model_ms(net, x))
    assert res.macs == flops.count(pruned).macs < flops.count(net).macs
    # the overhead outside the layers does not shrink with pruning here: the model learnt that from two networks
    assert res.fixed_ms == pytest.approx(OVERHEAD_MS, rel=1e-6)
    # every width a group stops at is one the device runs fast: a multiple of 4 here (nothing told the search)
    widths = [m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)]
    assert all(w % 4 == 0 for w in widths) and min(widths) < 16
    # the caller's model is untouched
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert json.loads(json.dumps(res.to_json()))["measured"] == res.measured


def test_a_tighter_target_prunes_more(tmp_path):
    net = _net()
    loose, _ = _search(net, 0.7, tmp_path)
    tight, _ = _search(net, 0.4, tmp_path)
    assert tight.macs < loose.macs
    assert tight.measured < loose.measured


def test_the_layer_table_is_cached_per_setup(tmp_path):
    net = _net()
    first, _ = _search(net, 0.5, tmp_path)
    assert first.table_measured > 0 and first.table_size == first.table_measured
    files = list(tmp_path.glob("latency-*.json"))
    assert len(files) == 1
    again, rt = _search(net, 0.5, tmp_path)
    assert again.table_measured == 0 and again.spec.rates == first.spec.rates  # every layer from the cache
    # another batch size is another table
    setup = LatencySetup(batch_size=4, repeats=3, warmup=0)
    find_latency_budget(net, l1_scores(net), target=0.5, setup=setup, runtime=FakeRuntime(setup), cache_dir=tmp_path)
    assert len(list(tmp_path.glob("latency-*.json"))) == 2
    # a damaged cache is measured again, not trusted and not fatal
    files[0].write_text("{not json")
    redone, _ = _search(net, 0.5, tmp_path)
    assert redone.table_measured == first.table_measured and redone.spec.rates == first.spec.rates


def test_bad_targets_and_setups_are_one_clear_error(tmp_path):
    net = _net()
    for bad in (1.5, 0, -0.2, "half"):
        with pytest.raises(HRankError, match="latency target"):
            _search(net, bad, tmp_path)
    with pytest.raises(HRankError, match="cannot be met"):
        _search(net, 0.01, tmp_path)
    with pytest.raises(HRankError, match="unknown latency runtime"):
        LatencySetup(runtime="tensorrt").check()
    with pytest.raises(HRankError, match="layout"):
        LatencySetup(layout="nhwc").check()
    with pytest.raises(HRankError, match="batch size"):
        LatencySetup(batch_size=0).check()


@pytest.mark.parametrize("runtime", ["torch", "torchscript", "onnxruntime"])
def test_real_torch_runtime_end_to_end_on_a_small_cnn(runtime):
    # the measuring path itself (timings are not asserted: this machine's load is not ours)
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    scores = {n: torch.rand(m.out_channels).numpy() for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}
    res = find_latency_budget(net, scores, target=0.6, input_size=(3, 32, 32), tolerance=0.5, rounds=2,
                              setup=LatencySetup(runtime=runtime, batch_size=4, threads=1, repeats=3, warmup=1))
    assert res.setup.runtime == runtime
    assert res.dense_ms > 0 and res.pruned_ms > 0 and res.measured == pytest.approx(res.pruned_ms / res.dense_ms)
    assert 1 <= res.rounds <= 2 and len(res.history) >= res.rounds
    assert res.macs < flops.count(net).macs


def test_onnxruntime_sessions_are_timed_without_idle_spinning():
    # sessions timed in alternation must not keep spinning on the cores after their run (see ort_timing_options)
    pytest.importorskip("onnxruntime")
    from hrank.latency import ort_timing_options

    opts = ort_timing_options(3)
    assert opts.get_session_config_entry("session.force_spinning_stop") == "1"
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert opts.intra_op_num_threads == 3 and opts.inter_op_num_threads == 1
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "get_num_threads", lambda: 5)
        assert ort_timing_options().intra_op_num_threads == 5


def test_cli_latency_target_errors_are_one_line(tmp_path, capsys):
    from hrank.cli import main

    for argv, msg in ((["--target-latency", "1.6"], "in (0, 1)"),
                      (["--target-latency", "0.5", "--target-macs", "0.5"], "give one of"),
                      (["--target-latency", "0.5", "--compress-rate", "[0.1]*19"], "replaces")):
        rc = main(["prune", "--model", "resnet_20", "--criterion", "l1", "--out", str(tmp_path / "o"), *argv])
        err = capsys.readouterr().err.strip()
        assert rc != 0 and msg in err and len(err.splitlines()) == 1
        assert not (tmp_path / "o").exists()


class _FlatRuntime(FakeRuntime):
    """Every network and layer takes the same time whatever its width (overhead-bound, or pure noise)."""

    def prepare(self, module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
        run = super().prepare(module, x)
        run.ms = 1.0  # type: ignore[attr-defined]
        return run


def test_no_width_faster_than_dense_is_an_error_not_an_unpruned_answer(tmp_path):
    net = _net()
    setup = LatencySetup(batch_size=2, repeats=3, warmup=0)
    with pytest.raises(HRankError, match="latency target 50% (cannot be met|not found)"):
        find_latency_budget(net, l1_scores(net), target=0.5, setup=setup, runtime=_FlatRuntime(setup))


def test_wide_groups_are_probed_at_a_bounded_number_of_widths():
    from hrank.latency import _record_steps

    faster = lambda counts: 100.0 - counts[0]  # noqa: E731 - every cut is faster than the last
    assert _record_steps(faster, 1, 0, 57, 1, 100.0, 64) == list(range(1, 58))  # narrow: every width
    assert _record_steps(faster, 1, 0, 230, 1, 100.0, 256) == list(range(4, 231, 4))  # 256 channels: every 4th
    assert _record_steps(faster, 1, 0, 230, 2, 100.0, 256) == list(range(4, 231, 4))  # in whole blocks of 2
    assert _record_steps(faster, 1, 0, 90, 3, 100.0, 96) == list(range(3, 91, 3))
    # a width no faster than a wider one is not a place to stop
    bumpy = lambda counts: 100.0 - counts[0] + (5.0 if counts[0] % 2 else 0.0)  # noqa: E731
    assert _record_steps(bumpy, 1, 0, 10, 1, 100.0, 16) == [2, 4, 6, 8, 10]


def test_one_noisy_end_to_end_measurement_does_not_end_in_the_unpruned_network(tmp_path, monkeypatch):
    # a busy machine timed the dense model 7x slow in round 1's comparison: the next goal must stay below the
    # dense time (else round 2 prunes nothing), and round 1's pruned network is kept over an unpruned round
    import hrank.latency as latency

    real = latency.compare_end_to_end
    calls = {"pruned": 0}

    def noisy(runs, runtime, **kw):
        out = real(runs, runtime, **kw)
        if "pruned" in runs:
            calls["pruned"] += 1
            if calls["pruned"] == 1:
                out = {**out, "dense": out["dense"] * 7}
        return out

    monkeypatch.setattr(latency, "compare_end_to_end", noisy)
    net = _net()
    res, _ = _search(net, 0.6, tmp_path, rounds=2)
    assert calls["pruned"] == 2 and len(res.history) == 2
    first, second = res.history
    assert first["ratio"] < 0.2  # the noise
    assert second["goal_ms"] < res.dense_ms and second["goal_ms"] <= 2 * first["goal_ms"]
    assert second["predicted_ms"] < res.dense_ms  # round 2 prunes
    assert res.rounds == 2 and res.measured == pytest.approx(second["ratio"])
    assert res.macs < flops.count(net).macs


def test_next_goal_is_damped_and_stays_below_the_dense_time():
    from hrank.latency import next_goal

    assert next_goal(60.0, 1.1, 100.0) == pytest.approx(66.0)  # an ordinary correction is applied as measured
    assert next_goal(60.0, 0.9, 100.0) == pytest.approx(54.0)
    assert next_goal(60.0, 0.1, 100.0) == pytest.approx(30.0)  # at most 2x down
    assert next_goal(60.0, 4.3, 100.0) == pytest.approx(80.0)  # up: at most half-way to the dense time
    assert next_goal(20.0, 4.3, 100.0) == pytest.approx(40.0)  # and at most 2x
