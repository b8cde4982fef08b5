"""``hrank run``: trained model -> ranks -> plan -> pruned -> fine-tuned -> evaluated -> report -> export.

The stages are compositions of :mod:`hrank.pipeline`'s steps (the same functions ``hrank rank/prune/
finetune/eval`` call). Every stage writes its artefacts into the run directory and records itself in
``stages.json`` with a hash of the configuration it depends on (and of the stages before it). Re-running the
same command skips every stage whose record and outputs are there, and the fine-tune resumes from its last
epoch, so a run interrupted at any point continues where it stopped. A run directory belongs to one
configuration: a different one is refused unless ``force`` is given, and then only the stages whose inputs
changed rerun.

Under ``torchrun`` every process runs every stage: ranks are computed on a share of the images each and
all-reduced, fine-tuning is DDP, evaluation is sharded and gathered; cheap stages are computed by every
process from the same files; files are written by rank 0 only, and the processes meet after each stage.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hrank import __version__, config, datasets, flops, models, pipeline
from hrank.checkpoint import load as load_model
from hrank.checkpoint import save as save_model
from hrank.data import Normalization, Split, load_batch_files
from hrank.datasets import DataOptions, DataSplits
from hrank.distributed import barrier, broadcast, init_distributed, on_main
from hrank.errors import HRankError
from hrank.io import (
    FreshOutput,
    OutputLock,
    atomic_save_with,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    holds_anything,
    read_json,
)
from hrank.plan import Plan
from hrank.profile import compare_latency, state_dict_bytes
from hrank.ranks import Ranks
from hrank.spec import Spec

STAGES = ("baseline", "scores", "spec", "plan", "prune", "finetune", "evaluate", "export", "report")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: str | None) -> Any:
    """What identifies an input file for caching: its path, size and modification time."""
    if not path:
        return None
    p = Path(path)
    if not p.exists():
        raise HRankError(f"file not found: {p}")
    st = p.stat()
    return [str(p.resolve()), st.st_size if p.is_file() else None, int(st.st_mtime)]


def rate_options(cfg: dict[str, Any], device: torch.device | None = None) -> pipeline.RateOptions:
    """The config's rate keys as the pipeline's ``RateOptions`` (a latency target is measured on ``device``
    with the torch runtime)."""
    latency = cache = None
    if cfg["target_latency"] is not None:
        from hrank.latency import LatencySetup

        on = str(device) if device is not None and cfg["latency_runtime"] != "onnxruntime" else "cpu"
        latency = LatencySetup(runtime=cfg["latency_runtime"], batch_size=cfg["latency_target_batch"],
                               layout=cfg["latency_layout"], threads=cfg["latency_threads"], device=on)
        cache = Path(os.environ.get("HRANK_CACHE") or Path.home() / ".cache" / "hrank")
    return pipeline.RateOptions(compress_rate=cfg["compress_rate"], rates=cfg["rates"], ignore=cfg["ignore"],
                                target_macs=cfg["target_macs"], target_params=cfg["target_params"],
                                target_latency=cfg["target_latency"], latency=latency, latency_cache=cache,
                                max_rate=cfg["max_rate"], budget_order=cfg["budget_order"], round_to=cfg["round_to"])


def data_options(cfg: dict[str, Any]) -> DataOptions:
    """The config's data keys as the dataset registry's ``DataOptions``."""
    return DataOptions(root=cfg["data_dir"], download=cfg["download"], val_size=cfg["val_size"], seed=cfg["seed"],
                       train_subset=cfg["train_subset"], test_subset=cfg["test_subset"],
                       image_size=cfg["image_size"], resize_size=cfg["resize_size"], workers=cfg["workers"])


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The config.json of an hrank run directory; an HRankError when ``run_dir`` is not one."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if not run_dir.is_dir():
        raise HRankError(f"{run_dir} is not a directory" if run_dir.exists() else f"run directory not found: {run_dir}")
    if not path.is_file():
        raise HRankError(f"{run_dir} is not an hrank run directory (no config.json)")
    saved = read_json(path, "run config")
    if not isinstance(saved, dict) or not isinstance(saved.get("identity"), dict):
        raise HRankError(f"{path} was not written by hrank run: {run_dir} is not an hrank run directory")
    return saved


def _export_files(formats: Sequence[str]) -> list[str]:
    """The files the export stage writes for ``formats``: its record and one file per format."""
    from hrank import export

    return ["export.json"] + [export.get(f).filename for f in formats]


# The JSON records of the stages: the stage that writes each, and the keys (with their types) the later stages
# and the summary read from it.
_NUMBER = (int, float)
_RECORDS: dict[str, tuple[str, dict[str, type | tuple[type, ...]]]] = {
    "baseline.json": ("baseline", {"source": str, "normalization": dict, "macs": _NUMBER, "params": _NUMBER}),
    "spec.json": ("spec", {"spec": dict}),
    "prune.json": ("prune", {"hrank_rule": dict, "after_prune": dict, "macs": _NUMBER, "params": _NUMBER}),
    "finetune.json": ("finetune", {"recipe": dict}),
    "final.json": ("evaluate", {"macs": _NUMBER, "params": _NUMBER}),
    "export.json": ("export", {}),
}


class Run:
    """One run directory and its configuration; ``execute`` runs (or skips) every stage in order."""

    def __init__(self, cfg: dict[str, Any], run_dir: str | os.PathLike, *, force: bool = False,
                 progress: bool = True, printer: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.force = force
        self.dist, self.device = init_distributed(cfg["device"])
        self.main = self.dist.is_main
        self.progress = progress and self.main
        self.print = printer if self.main else (lambda _: None)
        self.spec_info = models.get_spec(cfg["model"])
        self.stage_keys = self._stage_keys()
        self._data: DataSplits | None = None
        self._lossless: Split | None = None
        self.state: dict[str, Any] = {}
        self._fresh = FreshOutput.of(self.dir) if self.main and not self.dir.is_file() else None
        self._changed: list[str] = []  # config keys that differ from the run directory's (accepted with force)
        self._lock = OutputLock(self.dir)  # held by rank 0 from the claim to the end of execute
        self._everywhere(self._preflight)
        try:
            on_main(self._claim_directory, self.dist)
            barrier(self.dist)
        except BaseException:
            self._lock.release()
            raise

    # -- set-up -------------------------------------------------------------------------------------------
    def _everywhere(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on every process; if it fails on any, it fails on all (none is left waiting)."""
        if not self.dist.enabled:
            return fn()
        error = None
        try:
            result = fn()
        except HRankError as e:
            error, failure = str(e), e
        flags = [None] * self.dist.world_size
        torch.distributed.all_gather_object(flags, error)
        if error is not None:
            raise failure
        first = next((f for f in flags if f is not None), None)
        if first is not None:
            raise HRankError(f"another process failed: {first}")
        return result

    @property
    def input_size(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model sees: the dataset's."""
        return datasets.get(self.cfg["dataset"]).input_size(data_options(self.cfg))

    def _stage_keys(self) -> dict[str, str]:
        c = self.cfg
        data = [c["dataset"], c["seed"], c["val_size"]] + ([c["image_size"], c["resize_size"]]
                                                             if c["dataset"] not in ("cifar10", "cifar100") else [])
        base = _hash([c["model"], c["num_classes"], _file_id(c["checkpoint"]), c["normalization"], data,
                      [c["baseline"], c["train_subset"]] if not c["checkpoint"] else None])
        scores = _hash([base, c["criterion"], _file_id(c["ranks"]), c["rank_images"], c["rank_batch_size"],
                        c["rank_augment"]])
        latency = [c["target_latency"], c["latency_runtime"], c["latency_target_batch"], c["latency_layout"],
                   c["latency_threads"]] if c["target_latency"] is not None else []
        spec = _hash([scores, c["compress_rate"], c["rates"], c["target_macs"], c["target_params"], c["max_rate"],
                      c["budget_order"], c["round_to"]] + ([c["ignore"]] if c["ignore"] else []) + latency)
        plan = _hash([spec, c["coupling"], c["width_rule"]])
        prune = _hash([plan, c["mode"], c["recalibrate"], c["recalibrate_images"]])
        finetune = _hash([prune, c["finetune"], c["select_on_test"], c["train_subset"]])
        # the evaluate stage also times the baseline and the final model: what it measures is part of its key
        measured = [c["latency"]] + ([c["latency_batch"], c["latency_layout"], self._device_kind()]
                                     if c["latency"] else [])
        evaluate_key = _hash([finetune, c["test_subset"], _file_id(c["lossless_test"]), measured])
        export = _hash([evaluate_key, c["export"]])
        report = _hash([evaluate_key, export, c["latency"], c["latency_batch"], c["latency_layout"]])
        return {"baseline": base, "scores": scores, "spec": spec, "plan": plan, "prune": prune,
                "finetune": finetune, "evaluate": evaluate_key, "export": export, "report": report}

    def _preflight(self) -> None:
        """Checks of everything the stages will need, before anything is written: the run directory, the
        inputs, and (when a stage is left to run) the data and the sizes that depend on it."""
        c = self.cfg
        self._check_directory()
        loaded = pipeline.load_model(c["model"], checkpoint=c["checkpoint"], num_classes=self.num_classes,
                                     normalization=c["normalization"], dataset=c["dataset"])
        model = loaded.model
        rates = rate_options(c)
        if rates.target is None or self._will_run("spec"):
            # an unreachable target, or a latency target's bad setup or cache, fails now, not after ranking
            pipeline.check_rates(model, rates, out=self.dir)
        if c["ranks"]:
            pipeline.load_scores(c["ranks"], model, c["model"])
        if c["criterion"] != "hrank" and c["ranks"]:
            raise HRankError(f"'ranks' is a file of HRank ranks; criterion {c['criterion']} does not use it")
        datasets.check(c["dataset"], data_options(c))
        if c["lossless_test"] and not Path(c["lossless_test"]).is_file():
            raise HRankError(f"file not found: {c['lossless_test']}")
        finetune = config.finetune_recipe(c)
        baseline = config.baseline_recipe(c) if not c["checkpoint"] else None
        if self._stages_left():
            self._check_data(model, finetune, baseline)

    def _check_directory(self) -> None:
        """The run directory can be written, and what it holds is an hrank run (or nothing)."""
        if self.dir.exists() and not self.dir.is_dir():
            raise HRankError(f"--out {self.dir} is a file, expected a directory")
        check_writable(self.dir, "run directory")
        cfg_path, state_path = self.dir / "config.json", self.dir / "stages.json"
        if cfg_path.exists():
            try:
                saved = read_run_config(self.dir)
            except HRankError as e:
                raise HRankError(f"{e}; use another --out") from None
            mine, theirs = config.identity(self.cfg), saved["identity"]
            self._changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if self._changed and not self.force:
                raise HRankError(f"{self.dir} holds a run with a different config (changed: "
                                 f"{', '.join(self._changed)}); use another --out or --force to rerun what changed")
        elif holds_anything(self.dir) and not self.force:
            raise HRankError(f"{self.dir} exists and is not an hrank run directory; use another --out or --force")
        if state_path.exists():
            state = read_json(state_path, "stage record")
            if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
                raise HRankError(f"{state_path} is not a stage record written by hrank run; use another --out")
            self.state = state

    def _outputs(self, stage: str) -> list[str]:
        """The files a stage writes (all there, with its record, when it is done)."""
        return _export_files(self.cfg["export"]) if stage == "export" else self._OUTPUTS[stage]

    def _done(self, stage: str) -> bool:
        """The stage ran to the end with this configuration and its outputs are there."""
        rec = self.state.get(stage)
        return bool(rec is not None and rec.get("key") == self.stage_keys[stage] and rec.get("done")
                    and all((self.dir / o).exists() for o in self._outputs(stage)))

    def _will_run(self, stage: str) -> bool:
        """The stage will run: it, or a stage before it (which reruns every stage after it), is not done."""
        return not all(self._done(s) for s in STAGES[:STAGES.index(stage) + 1])

    def _stages_left(self) -> bool:
        return not all((self.state.get(s) or {}).get("key") == self.stage_keys[s] and self.state[s].get("done")
                       for s in STAGES)

    def _check_data(self, model: nn.Module, finetune: Any, baseline: Any) -> None:
        """Load the data now (download included) and check every size that depends on it."""
        c = self.cfg
        data = self.data  # validates the files, val_size and the lossless test file
        pipeline.check_classes(model, data.num_classes, c["dataset"])
        for what, recipe in (("finetune", finetune), ("baseline", baseline)):
            if recipe is not None and recipe.batch_size > len(data.finetune):
                raise HRankError(f"{what} batch_size {recipe.batch_size} is larger than the training set "
                                 f"({len(data.finetune)} images)")
            if recipe is not None and recipe.batch_size % self.dist.world_size:
                raise HRankError(f"{what} batch_size {recipe.batch_size} is not divisible by the "
                                 f"{self.dist.world_size} processes")
        if c["criterion"] == "hrank" and not c["ranks"] and c["rank_images"] > len(data.train):
            raise HRankError(f"rank_images {c['rank_images']} is more than the {len(data.train)} training images "
                             "(after the validation split); lower rank_images")

    def _claim_directory(self) -> None:
        """Make the directory this configuration's (checked in _check_directory): config.json is written."""
        self._lock.acquire()  # a second process on this directory stops here, before it writes anything
        cfg_path = self.dir / "config.json"
        mine = config.identity(self.cfg)
        if self._changed:
            self.print(f"config changed ({', '.join(self._changed)}): stages that depend on it will rerun")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_path, {"identity": mine, "config": self.cfg, "hrank_version": __version__,
                                     "world_size": self.dist.world_size})

    # -- stage bookkeeping --------------------------------------------------------------------------------
    _OUTPUTS = {"baseline": ["baseline.pt", "baseline.json"], "scores": ["scores.npz"], "spec": ["spec.json"],
                "plan": ["plan.json"], "prune": ["pruned.pt", "prune.json"], "finetune": ["finetune.json", "model.pt"],
                "evaluate": ["final.json"], "report": ["summary.json", "report.md", "report.html"]}
    # Work directories of stages that resume inside themselves (training); cleared when their inputs change.
    _WORK_DIRS = {"baseline": "baseline_train", "finetune": "finetune"}

    def _save_state(self) -> None:
        if self.main:
            atomic_write_json(self.dir / "stages.json", self.state)

    def _write(self, fn: Callable[[], Any]) -> None:
        """Writes happen on rank 0 only; the other processes wait for them (and learn of a failure)."""
        on_main(fn, self.dist)

    def _stage(self, stage: str, fn: Callable[[], None], *, main_only: bool = False) -> None:
        key = self.stage_keys[stage]
        rec = self.state.get(stage)
        if broadcast(self._done(stage), self.dist):  # rank 0 decides: every process skips or runs the same stages
            self.print(f"[{stage}] done before, skipped")
            return
        resuming = rec is not None and rec.get("key") == key
        work = self._WORK_DIRS.get(stage)

        def begin() -> None:
            if not resuming and work and (self.dir / work).exists():
                shutil.rmtree(self.dir / work)  # made for other inputs (the config changed under --force)
            for later in STAGES[STAGES.index(stage) + 1:]:  # they depend on this one
                self.state.pop(later, None)
            self.state[stage] = {"key": key, "done": False}
            self._save_state()

        self.print(f"[{stage}] {'resuming' if resuming and work else '...'}")
        self._write(begin)
        t0 = time.perf_counter()
        if main_only:
            on_main(fn, self.dist)
        else:
            fn()
        barrier(self.dist)
        self.state[stage] = {"key": key, "done": True, "seconds": round(time.perf_counter() - t0, 2)}
        self._save_state()

    def _read(self, name: str) -> dict:
        """A stage's JSON record; a damaged one is an HRankError that names it and how to redo its stage."""
        stage, keys = _RECORDS[name]
        path = self.dir / name
        redo = f"delete it and rerun to redo the {stage} stage and the stages after it"
        try:
            info = read_json(path, f"{stage} record")
        except HRankError as e:
            raise HRankError(f"{e}; {redo}") from None
        if not isinstance(info, dict):
            raise HRankError(f"{stage} record {path} holds {type(info).__name__}, not what hrank run writes; {redo}")
        for key, kind in keys.items():
            value = info.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise HRankError(f"{stage} record {path} has no valid {key!r}, not what hrank run writes; {redo}")
        return info

    # -- data ---------------------------------------------------------------------------------------------
    @property
    def data(self) -> DataSplits:
        if self._data is None:
            c = self.cfg
            self._data = pipeline.load_data(c["dataset"], data_options(c))
            if c["lossless_test"]:
                self._lossless = load_batch_files([Path(c["lossless_test"])], self._data.num_classes,
                                                  name="lossless")
        return self._data

    @property
    def num_classes(self) -> int:
        c = self.cfg
        if c["num_classes"]:
            return c["num_classes"]
        if c["dataset"] == "cifar100":
            return 100
        if c["dataset"] == "cifar10":
            return 10
        return self.data.num_classes  # image folders: one class per folder

    def _metrics(self, model: nn.Module, norm: Normalization, splits=("val", "test", "lossless")) -> dict:
        data = self.data
        named = {"val": data.val, "test": data.test, "lossless": self._lossless}
        return pipeline.evaluate_splits(model, {k: named[k] for k in splits}, normalization=norm, device=self.device)

    def _device_kind(self) -> str:
        """What the latencies were measured on, for the evaluate stage's key: the device type, and a GPU's name
        (a run resumed on another kind of device measures again instead of reporting the old device's times)."""
        if self.device.type == "cuda":
            return f"cuda {torch.cuda.get_device_name(self.device)}"
        return self.device.type

    def _profile(self, model: nn.Module) -> dict:
        c = flops.count(model, self.input_size)
        return {"macs": c.macs, "params": c.params, "size_bytes": state_dict_bytes(model)}

    def _latency(self, named: dict[str, nn.Module]) -> dict[str, dict]:
        """Batch-1 and batched latency of the given models, measured in alternation (same conditions)."""
        out: dict[str, dict] = {name: {} for name in named}
        cuda = self.device.type == "cuda"
        layout = self.cfg["latency_layout"]
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        # copies: the layout change must not reach the models the caller holds
        named = {k: copy.deepcopy(m).to(self.device, memory_format=fmt).eval() for k, m in named.items()}
        for key, batch, repeats in (("latency_b1_ms", 1, 20 if cuda else 10),
                                    ("latency_batch_ms", self.cfg["latency_batch"], 10 if cuda else 3)):
            for name, lat in compare_latency(named, self.input_size, batch, device=self.device, rounds=3,
                                             repeats=repeats, channels_last=layout == "channels_last").items():
                out[name][key] = lat.median_ms
                out[name]["latency_batch"] = self.cfg["latency_batch"]
                out[name]["latency_device"] = str(self.device)
                out[name]["latency_layout"] = layout
        return out

    # -- stages -------------------------------------------------------------------------------------------
    def _baseline(self) -> None:
        c = self.cfg
        loaded = pipeline.load_model(c["model"], checkpoint=c["checkpoint"], num_classes=self.num_classes,
                                     normalization=c["normalization"], dataset=c["dataset"])
        model, norm = loaded.model, loaded.normalization
        source = loaded.source
        if not c["checkpoint"]:
            recipe = config.baseline_recipe(c)
            self.print(f"no checkpoint: training a baseline ({recipe.name}, {recipe.epochs} epochs)")
            torch.manual_seed(c["seed"])
            model = models.create(c["model"], num_classes=self.num_classes)
            pipeline.finetune(model, self.data, recipe, normalization=norm, device=self.device,
                              out_dir=self.dir / "baseline_train", seed=c["seed"], resume=True,
                              progress=self.progress, printer=self.print)
            source = f"trained here ({recipe.name}, {recipe.epochs} epochs)"
        model = model.cpu().eval()
        info = {"source": source, "normalization": norm.to_json(), **self._metrics(model, norm),
                "evaluated_with": self._test_inputs()}
        info.update(self._profile(model))

        def write() -> None:
            save_model(model, self.dir / "baseline.pt", arch=c["model"], normalization=norm)
            atomic_write_json(self.dir / "baseline.json", info)

        self._write(write)
        self.print(f"baseline: {self._fmt_metrics(info)}")

    def _baseline_model(self) -> tuple[nn.Module, Normalization]:
        model, meta = load_model(self.dir / "baseline.pt")
        return model, Normalization.get(meta["normalization"])

    def _scores(self) -> None:
        c = self.cfg
        model, norm = self._baseline_model()
        if c["ranks"]:
            ranks = pipeline.load_scores(c["ranks"], model, c["model"])
            self.print(f"ranks from {c['ranks']} ({ranks.num_images} images)")
        else:
            ranks = pipeline.score_filters(model, c["criterion"], data=self.data.train, num_images=c["rank_images"],
                                           batch_size=c["rank_batch_size"], augment=c["rank_augment"],
                                           seed=c["seed"], normalization=norm, device=self.device,
                                           progress=self.progress)
        self._write(lambda: ranks.save(self.dir / "scores.npz"))

    def _spec(self) -> None:
        c = self.cfg
        model, _ = self._baseline_model()
        scores = Ranks.load(self.dir / "scores.npz", model=model)
        rates = rate_options(c, self.device)

        def build() -> dict:
            result = pipeline.build_spec(model, rates, scores, progress=self.print)
            info = result.to_json()
            if result.budget is not None:
                self.print(f"budget: {result.budget.describe()}")
                self.print(f"rates found: {info['compress_rate']}" if info["compress_rate"] else
                           "rates found: see spec.json")
            for note in result.spec.notes:
                self.print(f"note: {note}")
            return info

        # a latency target is timed by rank 0 alone: processes timing at once would disturb each other and
        # disagree; the others read spec.json when it is written
        info = on_main(build, self.dist) if c["target_latency"] is not None else build()

        def write() -> None:
            atomic_write_json(self.dir / "spec.json", info)
            if info["compress_rate"]:
                atomic_write_text(self.dir / "compress_rate.txt", info["compress_rate"] + "\n")

        self._write(write)

    def _spec_obj(self, model: nn.Module) -> Spec:
        return Spec.from_json(self._read("spec.json")["spec"], model)

    def _plan(self) -> None:
        c = self.cfg
        model, _ = self._baseline_model()
        scores = Ranks.load(self.dir / "scores.npz", model=model)
        plan = pipeline.make_plan(model, scores, self._spec_obj(model), criterion=c["criterion"],
                                  coupling=c["coupling"], width_rule=c["width_rule"])
        self._write(lambda: plan.save(self.dir / "plan.json"))
        self.print(plan.summary())
        for line in plan.skipped_lines(limit=20):
            self.print(f"skipped: {line}")

    def _prune(self) -> None:
        c = self.cfg
        model, norm = self._baseline_model()
        spec = self._spec_obj(model)
        data = self.data
        result = pipeline.prune_model(model, Plan.load(self.dir / "plan.json"), mode=c["mode"], spec=spec,
                                      calibration=data.train if c["recalibrate"] else None,
                                      calibration_images=c["recalibrate_images"], eval_split=data.val,
                                      normalization=norm, device=self.device, seed=c["seed"] + 2)
        info: dict[str, Any] = {"hrank_rule": {k: {"macs": v.macs, "params": v.params}
                                               for k, v in result.hrank_rule.items()}, "mode": c["mode"]}
        for stage in ("after_prune", "after_recalibration"):
            if stage in result.metrics or (stage == "after_prune"):
                m = result.metrics.get(stage)
                info[stage] = {"val_top1": m["top1"]} if m else {}
        if result.recalibrated_on is not None:
            info["recalibrated_on"] = result.recalibrated_on
        info.update(macs=result.after.macs, params=result.after.params)

        def write() -> None:
            save_model(result.model, self.dir / "pruned.pt", normalization=norm)
            atomic_write_json(self.dir / "prune.json", info)

        self._write(write)
        msg = f"pruned ({c['mode']}): {flops.format_count(info['macs'])} MACs, {flops.format_count(info['params'])} " \
              f"params; val top-1 {info['after_prune'].get('val_top1', float('nan')):.2f}% right after pruning"
        if "after_recalibration" in info:
            msg += f", {info['after_recalibration'].get('val_top1', float('nan')):.2f}% after BN recalibration"
        self.print(msg)

    def _finetune(self) -> None:
        c = self.cfg
        recipe = config.finetune_recipe(c)
        norm = Normalization.get(self._read("baseline.json")["normalization"])
        out = self.dir / "finetune"
        if recipe.layerwise:
            model, _ = self._baseline_model()
            plan = Plan.load(self.dir / "plan.json")
        else:
            model, _ = load_model(self.dir / "pruned.pt")
            plan = None
        teacher = self._baseline_model()[0] if recipe.distill_weight > 0 else None  # the unpruned model
        result = pipeline.finetune(model, self.data, recipe, normalization=norm, device=self.device, out_dir=out,
                                   seed=c["seed"], plan=plan, mode=c["mode"], resume=True,
                                   select_on_test=c["select_on_test"], progress=self.progress, teacher=teacher,
                                   printer=self.print)

        def write() -> None:
            atomic_write_json(self.dir / "finetune.json", {"recipe": recipe.to_json(), **result.to_json()})
            atomic_save_with(self.dir / "model.pt", lambda tmp: shutil.copyfile(out / "model.pt", tmp))

        self._write(write)

    def _test_inputs(self) -> list:
        """What the test metrics were computed on: the test subset and the lossless test file."""
        return [self.cfg["test_subset"], _file_id(self.cfg["lossless_test"])]

    def _evaluate(self) -> None:
        model, meta = load_model(self.dir / "model.pt")
        norm = Normalization.get(meta["normalization"])
        info = self._metrics(model, norm)
        info.update(self._profile(model))
        if self._read("baseline.json").get("evaluated_with") != self._test_inputs():
            # the test subset or the lossless file changed since the baseline was measured (--force keeps the
            # earlier stages): measure the baseline again on what the final model is measured on
            baseline, base_norm = self._baseline_model()
            info["baseline_test"] = self._metrics(baseline, base_norm, splits=("test", "lossless"))

        def latency_and_write() -> None:
            if self.cfg["latency"]:
                baseline, _ = self._baseline_model()
                lat = self._latency({"baseline": baseline, "final": model})
                info.update(lat["final"])
                info["baseline_latency"] = lat["baseline"]
            atomic_write_json(self.dir / "final.json", info)

        self._write(latency_and_write)  # timed on rank 0 alone, the others wait
        self.print(f"fine-tuned: {self._fmt_metrics(info)}")

    def _export(self) -> None:
        from hrank import export

        model, _ = load_model(self.dir / "model.pt")
        # the exports of an earlier model.pt (or of formats no longer asked for) must not lie beside this one:
        # the files the stage writes by name are removed first, then the asked formats are written again
        for name in _export_files(export.names()):
            (self.dir / name).unlink(missing_ok=True)
        info = pipeline.export_model(model, self.cfg["export"], self.dir, self.input_size, printer=self.print)
        atomic_write_json(self.dir / "export.json", info)

    def _report(self) -> None:
        from hrank.report import write_report

        summary = self.summary()
        atomic_write_json(self.dir / "summary.json", summary)
        md, html = write_report(self.dir, summary)
        self.print(f"report: {md} and {html}")

    # -- summary ------------------------------------------------------------------------------------------
    @staticmethod
    def _fmt_metrics(info: dict) -> str:
        parts = [f"{k.replace('_top1', '')} {v:.2f}%" for k, v in info.items() if k.endswith("_top1")]
        if "macs" in info:
            parts.append(f"{flops.format_count(info['macs'])} MACs, {flops.format_count(info['params'])} params")
        return ", ".join(parts)

    def summary(self) -> dict[str, Any]:
        """Everything the report shows, gathered from the stage artefacts (also written as summary.json)."""
        c = self.cfg
        base, prune, final = self._read("baseline.json"), self._read("prune.json"), self._read("final.json")
        if isinstance(final.get("baseline_test"), dict):  # measured again on the final model's test inputs
            base = {k: v for k, v in base.items() if not k.startswith(("test_", "lossless_"))}
            base.update(final["baseline_test"])
        spec_info, ft = self._read("spec.json"), self._read("finetune.json")
        plan = Plan.load(self.dir / "plan.json")
        scores = Ranks.load(self.dir / "scores.npz")
        stages = [{"name": "baseline", **base, **final.get("baseline_latency", {})},
                  {"name": "pruned, no fine-tune", "macs": prune["macs"], "params": prune["params"],
                   **prune["after_prune"]}]
        if "after_recalibration" in prune:
            stages.append({"name": "pruned + BN recalibration", "macs": prune["macs"], "params": prune["params"],
                           **prune["after_recalibration"]})
        stages.append({"name": "fine-tuned", **final})
        layers = []
        for g in plan.groups:
            for m in g.members:
                s = scores.scores.get(m)
                kept = list(g.kept)
                row: dict[str, Any] = {"name": m, "before": g.channels, "after": len(kept), "kept": kept}
                if s is not None:
                    s = np.asarray(s, dtype=float)
                    removed = np.setdiff1d(np.arange(g.channels), kept)
                    row.update(scores=s.tolist(), mean_rank_kept=float(s[kept].mean()) if kept else None,
                               mean_rank_removed=float(s[removed].mean()) if len(removed) else None)
                layers.append(row)
        position = {name: i for i, name in enumerate(scores.scores)}  # module order (the order ranks were taken)
        layers.sort(key=lambda row: position.get(row["name"], len(position)))
        curves = []
        metrics = self.dir / "finetune" / "metrics.jsonl"
        if metrics.exists():
            try:
                curves = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()
                          if line.strip()]
                damaged = not all(isinstance(row, dict) for row in curves)
            except (json.JSONDecodeError, UnicodeDecodeError):
                damaged = True
            if damaged:
                raise HRankError(f"fine-tune log {metrics} is damaged (not one JSON mapping a line); delete the "
                                 "finetune folder and finetune.json and rerun to redo the fine-tune")
        speedup = None
        base_lat = final.get("baseline_latency", {})
        if base_lat.get("latency_batch_ms") and final.get("latency_batch_ms"):
            speedup = base_lat["latency_batch_ms"] / final["latency_batch_ms"]
        facts = {
            "model": f"{c['model']} ({base['source']})",
            "criterion": c["criterion"] + (f" ({scores.num_images} images)" if c["criterion"] == "hrank" else ""),
            "rates": spec_info.get("compress_rate") or "by layer name (spec.json)",
            "mode": c["mode"] + ("" if c["mode"] == "physical" else " (zero masks: no real speed-up)"),
            "MACs": f"{flops.format_count(final['macs'])} of {flops.format_count(base['macs'])} "
                    f"({final['macs'] / base['macs']:.1%}); HRank's own rule counts "
                    f"{flops.format_count(prune['hrank_rule']['as_pruned']['macs'])}",
            "fine-tune": f"{ft['recipe']['name']} recipe, {ft.get('epochs_run')} epochs, best epoch "
                         f"{ft.get('best_epoch')} selected on {ft.get('selected_on')}",
        }
        if speedup:
            facts["speed-up"] = (f"{speedup:.2f}x at batch {final.get('latency_batch')} on "
                                 f"{final.get('latency_device')}, {final.get('latency_layout', 'nchw')} "
                                 f"(MAC ratio {base['macs'] / final['macs']:.2f}x)")
        if spec_info.get("budget", {}).get("metric") == "latency":
            b = spec_info["budget"]
            s = b["setup"]
            facts["budget"] = (f"latency target {b['target']:.0%} of the dense model, measured {b['measured']:.1%} "
                               f"({b['pruned_ms']:.2f} vs {b['dense_ms']:.2f} ms, {s['runtime']}, batch "
                               f"{s['batch_size']}, BatchNorm folded; {b['error']:.1%} off)")
        elif "budget" in spec_info:
            b = spec_info["budget"]
            facts["budget"] = (f"target {flops.format_count(b['target'])} {b['metric']}, achieved "
                               f"{flops.format_count(b['achieved'])} ({b['error']:.2%} off), widths in multiples "
                               f"of {b.get('round_to', 1)}")
        nan = float("nan")
        headline = (f"{c['model']}: {flops.format_count(base['macs'])} -> {flops.format_count(final['macs'])} MACs, "
                    f"test top-1 {base.get('test_top1', nan):.2f}% -> {final.get('test_top1', nan):.2f}%")
        if c["dataset"] not in ("cifar10", "cifar100"):  # top-5 is what ImageNet results are also quoted in
            headline += f", top-5 {base.get('test_top5', nan):.2f}% -> {final.get('test_top5', nan):.2f}%"
        notes = []
        if ft.get("selected_on") == "test":
            notes.append("The best epoch was selected on the TEST set: the test accuracy is optimistically biased.")
        else:
            notes.append("The best epoch was selected on a validation split carved from the training set.")
        if c["test_subset"]:
            notes.append(f"Test accuracy on the first {c['test_subset']} test images only.")
        return {"title": f"hrank run: {c['model']}", "headline": headline, "facts": facts, "stages": stages,
                "layers": layers, "curves": curves, "notes": notes, "config": c,
                "exports": self._read("export.json") if (self.dir / "export.json").exists() else {}}

    # -- driver -------------------------------------------------------------------------------------------
    def execute(self) -> dict[str, Any]:
        """Run every stage that is not done yet; return the summary.

        An error (HRankError) leaves a directory that was new (or empty) as it was, unless training has saved
        a checkpoint in it: that work is kept for the next invocation to resume.
        """
        try:
            return self._execute()
        except HRankError:
            if self._fresh is not None and not any(self.dir.rglob("last.pt")):
                self._fresh.undo()
            raise
        finally:
            self._lock.release()

    def _execute(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._stage("baseline", self._baseline)
        self._stage("scores", self._scores)
        self._stage("spec", self._spec)
        self._stage("plan", self._plan)
        self._stage("prune", self._prune)
        self._stage("finetune", self._finetune)
        self._stage("evaluate", self._evaluate)
        self._stage("export", self._export, main_only=True)
        self._stage("report", self._report, main_only=True)
        self.print(f"done in {time.perf_counter() - t0:.0f} s: {self.dir}")
        return self.summary()


def run(cfg: dict[str, Any], run_dir: str | os.PathLike, *, force: bool = False, progress: bool = True,
        printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the whole pipeline for a resolved config (``hrank.config.resolve``); under torchrun,
    on every process (see the module docstring)."""
    return Run(cfg, run_dir, force=force, progress=progress, printer=printer).execute()
