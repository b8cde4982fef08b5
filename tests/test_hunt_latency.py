"""Bug-hunt fixes in latency budgets (hrank.latency, ``hrank prune --target-latency``): the cache, the setup's
bounds, runtimes that cannot take a model, the cache's place, and flag combinations the search cannot honour."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import torch
from torch import nn

from hrank.cli import main
from hrank.errors import HRankError
from hrank.latency import LatencySetup, LayerTable, check_cache_dir, find_latency_budget
from tests.test_latency_budget import FakeRuntime


def _setup(**kw) -> LatencySetup:
    return LatencySetup(**{"batch_size": 2, "repeats": 3, "warmup": 0, **kw})


def _small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def _scores(net: nn.Module) -> dict:
    return {n: torch.rand(m.out_channels, generator=torch.Generator().manual_seed(1)).numpy()
            for n, m in net.named_modules() if isinstance(m, nn.Conv2d)}


def _prune(tmp_path, capsys, *argv: str) -> tuple[int, str]:
    try:
        rc = main(["prune", "--model", "resnet_20", "--criterion", "l1", "--out", str(tmp_path / "o"), *argv])
    except SystemExit as e:  # argparse's own one-line errors
        rc = e.code
    return rc, capsys.readouterr().err.strip()


def _one_line_error(rc: int, err: str, tmp_path, *needles: str) -> None:
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not (tmp_path / "o").exists()


# -- 1. the cache file ---------------------------------------------------------------------------------------

CONV = nn.Conv2d(8, 8, 3, padding=1)


@pytest.mark.parametrize("content", ["[]", '{"entries": 5}', '{"identity": {}, "entries": []}', "null", "{not json",
                                     b"\xff\xfe\x00garbage"])
def test_a_cache_file_of_the_wrong_shape_is_measured_again_with_one_warning(tmp_path, content):
    setup = _setup()
    path = LayerTable.open(setup, tmp_path, FakeRuntime(setup)).path
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    said: list[str] = []
    table = LayerTable.open(setup, tmp_path, FakeRuntime(setup), warn=said.append)
    assert table.entries == {}
    assert len(said) == 1 and str(path) in said[0] and "measuring again" in said[0] and "\n" not in said[0]
    assert table.layer_ms(CONV, (8, 6, 6), 8, 8) > 0 and table.measured == 1


def test_cached_timings_that_are_not_finite_positive_numbers_are_measured_again(tmp_path):
    setup = _setup()
    first = LayerTable.open(setup, tmp_path, FakeRuntime(setup))
    widths = [(8, 8), (8, 4), (4, 4), (4, 8), (8, 2), (2, 8), (2, 2), (1, 1)]
    truth = {w: first.layer_ms(CONV, (8, 6, 6), *w) for w in widths}
    first.save()
    data = json.loads(first.path.read_text())
    keys = list(data["entries"])
    text = json.dumps(data)
    for key, bad in zip(keys, ["NaN", "Infinity", "-Infinity", "0", "-1.5", '"1.0"', "1" + "0" * 400],
                        strict=False):
        text = text.replace(f'"{key}": {json.dumps(data["entries"][key])}', f'"{key}": {bad}')
    first.path.write_text(text)
    said: list[str] = []
    table = LayerTable.open(setup, tmp_path, FakeRuntime(setup), warn=said.append)
    assert list(table.entries) == keys[7:]  # only the one valid entry is trusted
    assert len(said) == 1 and "7 of 8 timings" in said[0]
    # the bad ones are measured again and come back as the runtime's real times
    assert {w: table.layer_ms(CONV, (8, 6, 6), *w) for w in widths} == truth
    assert table.measured == 7
    table.save()
    assert all(v > 0 for v in json.loads(table.path.read_text())["entries"].values())


def test_a_search_over_a_damaged_cache_warns_and_finishes(tmp_path):
    net, setup = _small_net(), _setup()
    said: list[str] = []
    runtime = FakeRuntime(setup)
    path = LayerTable.open(setup, tmp_path, runtime).path
    path.write_text("[]")
    res = find_latency_budget(net, _scores(net), target=0.6, input_size=(3, 8, 8), setup=setup, runtime=runtime,
                              cache_dir=tmp_path, tolerance=0.5, progress=said.append)
    assert res.table_measured > 0 and res.measured < 1
    assert [s for s in said if s.startswith("warning:")] == [f"warning: latency cache {path}: not a latency table "
                                                             f"(no mapping of timings under 'entries'); measuring "
                                                             f"again"]
    assert isinstance(json.loads(path.read_text())["entries"], dict)  # rewritten whole


def test_a_runtime_that_measures_a_non_positive_time_is_an_error_not_a_timing(tmp_path):
    class Broken(FakeRuntime):
        def times(self, run: Callable[[], None], repeats: int, warmup: int) -> list[float]:
            return [float("nan")] * repeats

    setup = _setup()
    table = LayerTable.open(setup, tmp_path, Broken(setup))
    with pytest.raises(HRankError, match="finite and positive"):
        table.layer_ms(CONV, (8, 6, 6), 8, 8)
    assert table.entries == {}


# -- 2. the setup's bounds ------------------------------------------------------------------------------------

def test_huge_latency_batch_and_threads_are_refused_in_one_line(tmp_path, capsys):
    for kw, msg in (({"batch_size": 10**9}, "batch size must be a whole number from 1 to 4096"),
                    ({"batch_size": True}, "batch size"),
                    ({"threads": 10**9}, "threads must be a whole number from 1 to 1024"),
                    ({"threads": 2**31}, "threads")):
        with pytest.raises(HRankError, match=msg):
            LatencySetup(**kw).check()
    LatencySetup(batch_size=4096, threads=1024).check()  # the bounds themselves are fine
    for flag, msg in (("--latency-batch", "latency batch size"), ("--latency-threads", "latency threads")):
        rc, err = _prune(tmp_path, capsys, "--target-latency", "0.5", flag, str(10**9))
        _one_line_error(rc, err, tmp_path, msg, "1000000000")


# -- 3. runtimes that cannot take the model -------------------------------------------------------------------

class _DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.conv(x).mean((2, 3))}


def test_a_model_torchscript_cannot_trace_is_one_clear_error():
    from hrank.latency import TorchRuntime, TorchScriptRuntime

    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(HRankError, match=r"torchscript latency runtime cannot run _DictNet .*--latency-runtime "
                                         r"torch\)$") as info:
        TorchScriptRuntime(_setup(runtime="torchscript")).prepare(_DictNet().eval(), x)
    assert "\n" not in str(info.value)
    TorchRuntime(_setup()).prepare(_DictNet().eval(), x)()  # the suggested runtime runs it


def test_a_model_onnx_cannot_export_is_one_clear_error_without_a_graph_dump(tmp_path, capfd):
    pytest.importorskip("onnxruntime")
    from hrank.latency import OnnxRuntime

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AdaptiveAvgPool2d((3, 3)), nn.Flatten(),
                        nn.Linear(72, 4)).eval()
    capfd.readouterr()
    with pytest.raises(HRankError, match=r"onnxruntime latency runtime cannot run Sequential .*adaptive_avg_pool2d"
                                         r".*--latency-runtime torch\)$") as info:
        OnnxRuntime(_setup(runtime="onnxruntime")).prepare(net, torch.randn(1, 3, 10, 10))
    assert "\n" not in str(info.value)
    out = capfd.readouterr()
    assert "graph" not in out.out and "graph" not in out.err  # the exporter's dump of the whole graph is silenced
    # the same through the search: the dense model fails before any layer is timed
    with pytest.raises(HRankError, match="onnxruntime latency runtime cannot run"):
        find_latency_budget(net, _scores(net), target=0.6, input_size=(3, 10, 10), cache_dir=tmp_path,
                            setup=_setup(runtime="onnxruntime", threads=1))


# -- 4. where the cache lives ---------------------------------------------------------------------------------

def test_a_latency_cache_inside_the_output_or_unwritable_is_refused_up_front(tmp_path, capsys):
    out = tmp_path / "o"
    for bad in (out, out / "cache", out / "a" / ".." / "b"):
        with pytest.raises(HRankError, match="inside the output directory"):
            check_cache_dir(bad, out=out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(HRankError, match="is a file"):
        check_cache_dir(tmp_path / "file")
    with pytest.raises(HRankError, match="cannot create latency cache"):
        check_cache_dir(tmp_path / "file" / "sub")
    assert check_cache_dir(tmp_path / "elsewhere", out=out) == tmp_path / "elsewhere"
    # the library checks before it measures anything
    setup = _setup()
    runtime = FakeRuntime(setup)
    with pytest.raises(HRankError, match="cannot create latency cache"):
        find_latency_budget(_small_net(), _scores(_small_net()), target=0.5, input_size=(3, 8, 8), setup=setup,
                            runtime=runtime, cache_dir=tmp_path / "file" / "sub")
    assert runtime.prepared == 0
    # the CLI before it loads anything
    rc, err = _prune(tmp_path, capsys, "--target-latency", "0.5", "--latency-cache", str(out / "cache"))
    _one_line_error(rc, err, tmp_path, "inside the output directory")
    rc, err = _prune(tmp_path, capsys, "--target-latency", "0.5", "--latency-cache", str(tmp_path / "file"))
    _one_line_error(rc, err, tmp_path, "is a file")


def test_a_cache_that_cannot_be_saved_at_the_end_costs_a_warning_not_the_result(tmp_path, monkeypatch):
    import hrank.latency as latency

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(latency, "atomic_write_json", full)
    net, setup = _small_net(), _setup()
    said: list[str] = []
    res = find_latency_budget(net, _scores(net), target=0.6, input_size=(3, 8, 8), setup=setup,
                              runtime=FakeRuntime(setup), cache_dir=tmp_path, tolerance=0.5, progress=said.append)
    assert res.measured < 1
    warned = [s for s in said if s.startswith("warning:")]
    assert warned and all("not saved (No space left on device)" in s for s in warned)


# -- 5, 6, 7. flags of hrank prune ---------------------------------------------------------------------------

def test_round_to_must_be_positive_and_is_refused_with_a_latency_target(tmp_path, capsys):
    for bad, target in (("0", "--target-macs"), ("-8", "--target-latency"), ("0", None)):
        rc, err = _prune(tmp_path, capsys, *([target, "0.5"] if target else ["--compress-rate", "[0.1]*19"]),
                         "--round-to", bad)
        _one_line_error(rc, err, tmp_path, "--round-to", f"round_to must be a positive integer, got {bad}")
    rc, err = _prune(tmp_path, capsys, "--target-latency", "0.5", "--round-to", "8")
    _one_line_error(rc, err, tmp_path, "--round-to does not apply to --target-latency", "measured")
    rc, err = _prune(tmp_path, capsys, "--compress-rate", "[0.1]*19", "--round-to", "8")  # no search to round
    _one_line_error(rc, err, tmp_path, "--round-to rounds the widths", "drop --round-to")
    # a MACs target still takes it, and the default is the config's
    from hrank.cli import build_parser
    from hrank.cli.prune import ROUND_TO_DEFAULT, _rate_options

    base = ["prune", "--model", "resnet_20", "--out", "x", "--target-macs", "0.5"]
    assert _rate_options(build_parser().parse_args(base + ["--round-to", "16"])).round_to == 16
    assert _rate_options(build_parser().parse_args(base)).round_to == ROUND_TO_DEFAULT == 8


def test_a_latency_target_in_mask_mode_is_refused(tmp_path, capsys):
    rc, err = _prune(tmp_path, capsys, "--target-latency", "0.5", "--mode", "mask")
    _one_line_error(rc, err, tmp_path, "--mode mask", "dense model's speed", "--mode physical")


def test_the_target_batch_flag_of_prune_and_of_run(tmp_path):
    from hrank import config
    from hrank.cli import build_parser
    from hrank.cli.prune import _rate_options
    from hrank.cli.run import _overrides

    def setup(*argv: str) -> LatencySetup:
        args = build_parser().parse_args(["prune", "--model", "resnet_20", "--out", "x", "--target-latency", "0.5",
                                          *argv])
        return _rate_options(args).latency

    # hrank prune: --latency-batch is the target's batch; run's name for it is accepted too
    assert setup("--latency-batch", "4").batch_size == 4
    assert setup("--latency-target-batch", "6").batch_size == 6
    assert setup().batch_size == 1
    # hrank run: --latency-target-batch is the target's batch, --latency-batch the report's timing batch
    run = _overrides(build_parser().parse_args(["run", "--latency-batch", "64", "--latency-target-batch", "2"]))
    assert run == {"latency_batch": 64, "latency_target_batch": 2}
    assert "target" in config.KEYS["latency_target_batch"].help and "target" not in config.KEYS["latency_batch"].help
