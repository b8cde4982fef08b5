"""``hrank run``: trained model -> ranks -> plan -> pruned -> fine-tuned -> evaluated -> report -> export.

Every stage writes its artefacts into the run directory and records itself in ``stages.json`` with a hash
of the configuration it depends on (and of the stages before it). Re-running the same command skips every
stage whose record and outputs are there, and the fine-tune resumes from its last epoch, so a run
interrupted at any point continues where it stopped. A run directory belongs to one configuration: a
different one is refused unless ``force`` is given, and then only the stages whose inputs changed rerun.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hrank import __version__, config, flops, models
from hrank.budget import BudgetResult, find_budget, parse_target
from hrank.checkpoint import load as load_model
from hrank.checkpoint import load_weights
from hrank.checkpoint import save as save_model
from hrank.criteria import l1_scores, weight_scores
from hrank.data import ImageSet, Normalization, check_cifar, default_data_dir, load_batch_files, load_cifar
from hrank.distributed import resolve_device
from hrank.errors import HRankError
from hrank.io import FreshOutput, atomic_save_with, atomic_write_json, atomic_write_text, check_writable, read_json
from hrank.plan import Plan, make_plan
from hrank.profile import compare_latency, state_dict_bytes
from hrank.prune import apply_plan, hrank_rule_counts, recalibrate_bn
from hrank.ranks import Ranks, compute_ranks, model_fingerprint
from hrank.spec import Spec
from hrank.train import evaluate, fit, make_eval_batches, make_train_batches, split_train_val
from hrank.validate import check_finite

STAGES = ("baseline", "scores", "spec", "plan", "prune", "finetune", "evaluate", "export", "report")


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_id(path: str | None) -> Any:
    """What identifies an input file for caching: its path, size and modification time."""
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        raise HRankError(f"file not found: {p}")
    st = p.stat()
    return [str(p.resolve()), st.st_size, int(st.st_mtime)]


class Run:
    """One run directory and its configuration; ``execute`` runs (or skips) every stage in order."""

    def __init__(self, cfg: dict[str, Any], run_dir: str | os.PathLike, *, force: bool = False,
                 progress: bool = True, printer: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.dir = Path(run_dir)
        self.force = force
        self.progress = progress
        self.print = printer
        self.device = self._device(cfg["device"])
        self.spec_info = models.get_spec(cfg["model"])
        self.input_size = self.spec_info.input_size
        self.stage_keys = self._stage_keys()
        self._data: dict[str, ImageSet | None] | None = None
        self.state: dict[str, Any] = {}
        self._fresh = FreshOutput.of(self.dir) if not self.dir.is_file() else None  # what an early error undoes
        self._changed: list[str] = []  # config keys that differ from the run directory's (accepted with force)
        self._preflight()
        self._claim_directory()

    # -- set-up -------------------------------------------------------------------------------------------
    @staticmethod
    def _device(name: str) -> torch.device:
        return resolve_device(name)

    def _stage_keys(self) -> dict[str, str]:
        c = self.cfg
        base = _hash([c["model"], c["num_classes"], _file_id(c["checkpoint"]), c["normalization"], c["dataset"],
                      c["seed"], c["val_size"],
                      [c["baseline"], c["train_subset"]] if not c["checkpoint"] else None])
        scores = _hash([base, c["criterion"], _file_id(c["ranks"]), c["rank_images"], c["rank_batch_size"],
                        c["rank_augment"]])
        spec = _hash([scores, c["compress_rate"], c["rates"], c["target_macs"], c["target_params"], c["max_rate"],
                      c["budget_order"], c["round_to"]] + ([c["ignore"]] if c["ignore"] else []))
        plan = _hash([spec, c["coupling"], c["width_rule"]])
        prune = _hash([plan, c["mode"], c["recalibrate"], c["recalibrate_images"]])
        finetune = _hash([prune, c["finetune"], c["select_on_test"], c["train_subset"]])
        evaluate_key = _hash([finetune, c["test_subset"], _file_id(c["lossless_test"])])
        export = _hash([evaluate_key, c["export"]])
        report = _hash([evaluate_key, export, c["latency"], c["latency_batch"], c["latency_layout"]])
        return {"baseline": base, "scores": scores, "spec": spec, "plan": plan, "prune": prune,
                "finetune": finetune, "evaluate": evaluate_key, "export": export, "report": report}

    def _preflight(self) -> None:
        """Checks of everything the stages will need, before anything is written: the run directory, the
        inputs, and (when a stage is left to run) the data and the sizes that depend on it."""
        c = self.cfg
        self._check_directory()
        model = models.create(c["model"], num_classes=self.num_classes)
        if c["checkpoint"]:
            load_weights(model, c["checkpoint"])
            check_finite(model, f"checkpoint {c['checkpoint']}")
        if c["compress_rate"] is not None:
            Spec.from_string(model, c["compress_rate"]).without(model, c["ignore"] or ())
        elif c["rates"] is not None:
            from hrank.spec import parse_mapping_string

            Spec.from_mapping(model, parse_mapping_string(c["rates"]) if isinstance(c["rates"], str) else c["rates"],
                              ignore=c["ignore"] or ())
        else:
            parse_target(c["target_macs"] if c["target_macs"] is not None else c["target_params"])
            if not (self.dir / "spec.json").exists():  # a target that cannot be met fails now, not after ranking
                self._find_budget(model, l1_scores(model))
        if c["ranks"]:
            Ranks.load(c["ranks"], model=model)
        check_cifar(c["data_dir"] or default_data_dir(), c["dataset"], download=c["download"])
        for path in (c["lossless_test"],):
            if path and not Path(path).is_file():
                raise HRankError(f"file not found: {path}")
        finetune = config.finetune_recipe(c)
        baseline = config.baseline_recipe(c) if not c["checkpoint"] else None
        if self._stages_left():
            self._check_data(finetune, baseline)

    def _check_directory(self) -> None:
        """The run directory can be written, and what it holds is an hrank run (or nothing)."""
        if self.dir.exists() and not self.dir.is_dir():
            raise HRankError(f"--out {self.dir} is a file, expected a directory")
        check_writable(self.dir, "run directory")
        cfg_path, state_path = self.dir / "config.json", self.dir / "stages.json"
        if cfg_path.exists():
            saved = read_json(cfg_path, "run config")
            if not isinstance(saved, dict) or not isinstance(saved.get("identity"), dict):
                raise HRankError(f"{cfg_path} was not written by hrank run: {self.dir} is not an hrank run directory; "
                                 "use another --out")
            mine, theirs = config.identity(self.cfg), saved["identity"]
            self._changed = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
            if self._changed and not self.force:
                raise HRankError(f"{self.dir} holds a run with a different config (changed: "
                                 f"{', '.join(self._changed)}); use another --out or --force to rerun what changed")
        elif self.dir.is_dir() and any(self.dir.iterdir()) and not self.force:
            raise HRankError(f"{self.dir} exists and is not an hrank run directory; use another --out or --force")
        if state_path.exists():
            state = read_json(state_path, "stage record")
            if not isinstance(state, dict) or not all(isinstance(v, dict) for v in state.values()):
                raise HRankError(f"{state_path} is not a stage record written by hrank run; use another --out")
            self.state = state

    def _stages_left(self) -> bool:
        return not all((self.state.get(s) or {}).get("key") == self.stage_keys[s] and self.state[s].get("done")
                       for s in STAGES)

    def _check_data(self, finetune: Any, baseline: Any) -> None:
        """Load the data now (download included) and check every size that depends on it."""
        c = self.cfg
        data = self.data  # validates the files, val_size and the lossless test file
        classes = data["train"].num_classes
        if self.num_classes != classes:
            raise HRankError(f"num_classes {self.num_classes} does not match {c['dataset']} ({classes} classes)")
        for what, recipe in (("finetune", finetune), ("baseline", baseline)):
            if recipe is not None and recipe.batch_size > len(data["finetune"]):
                raise HRankError(f"{what} batch_size {recipe.batch_size} is larger than the training set "
                                 f"({len(data['finetune'])} images)")
        if c["criterion"] == "hrank" and not c["ranks"] and c["rank_images"] > len(data["train"]):
            raise HRankError(f"rank_images {c['rank_images']} is more than the {len(data['train'])} training images "
                             "(after the validation split); lower rank_images")

    def _claim_directory(self) -> None:
        """Make the directory this configuration's (checked in _check_directory): config.json is written."""
        cfg_path = self.dir / "config.json"
        mine = config.identity(self.cfg)
        if self._changed:
            self.print(f"config changed ({', '.join(self._changed)}): stages that depend on it will rerun")
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(cfg_path, {"identity": mine, "config": self.cfg, "hrank_version": __version__})

    # -- stage bookkeeping --------------------------------------------------------------------------------
    # Work directories of stages that resume inside themselves (training); cleared when their inputs change.
    _WORK_DIRS = {"baseline": "baseline_train", "finetune": "finetune"}

    def _save_state(self) -> None:
        atomic_write_json(self.dir / "stages.json", self.state)

    def _stage(self, stage: str, outputs: list[str], fn: Callable[[], None]) -> None:
        key = self.stage_keys[stage]
        rec = self.state.get(stage)
        if rec is not None and rec.get("key") == key and rec.get("done") \
                and all((self.dir / o).exists() for o in outputs):
            self.print(f"[{stage}] done before, skipped")
            return
        resuming = rec is not None and rec.get("key") == key
        work = self._WORK_DIRS.get(stage)
        if not resuming and work and (self.dir / work).exists():
            shutil.rmtree(self.dir / work)  # made for other inputs (the config changed under --force)
        self.print(f"[{stage}] {'resuming' if resuming and work else '...'}")
        for later in STAGES[STAGES.index(stage) + 1:]:  # they depend on this one
            self.state.pop(later, None)
        self.state[stage] = {"key": key, "done": False}
        self._save_state()
        t0 = time.perf_counter()
        fn()
        self.state[stage] = {"key": key, "done": True, "seconds": round(time.perf_counter() - t0, 2)}
        self._save_state()

    def _read(self, name: str) -> dict:
        return json.loads((self.dir / name).read_text())

    # -- data ---------------------------------------------------------------------------------------------
    @property
    def data(self) -> dict[str, ImageSet | None]:
        if self._data is None:
            c = self.cfg
            data_dir = c["data_dir"] or str(default_data_dir())
            train = load_cifar(data_dir, c["dataset"], "train", download=c["download"])
            test = load_cifar(data_dir, c["dataset"], "test", download=c["download"])
            if c["val_size"] >= len(train):
                raise HRankError(f"val_size {c['val_size']} leaves no training images ({len(train)} in total)")
            train_part, val = split_train_val(train, c["val_size"], seed=c["seed"])
            ft_train = train_part
            if c["train_subset"] is not None and c["train_subset"] < len(train_part):
                pick = np.random.default_rng(c["seed"] + 1).permutation(len(train_part))[: c["train_subset"]]
                ft_train = train_part.subset(np.sort(pick), f"{train_part.name}[subset]")
            if c["test_subset"] is not None and c["test_subset"] < len(test):
                test = test.subset(np.arange(c["test_subset"]), f"{test.name}[:{c['test_subset']}]")
            lossless = None
            if c["lossless_test"]:
                lossless = load_batch_files([Path(c["lossless_test"])], train.num_classes, name="lossless")
            # "train" feeds ranks and BN recalibration; "finetune" (maybe a subset) feeds training
            self._data = {"train": train_part, "finetune": ft_train, "val": val, "test": test, "lossless": lossless}
        return self._data

    @property
    def num_classes(self) -> int:
        return self.cfg["num_classes"] or (100 if self.cfg["dataset"] == "cifar100" else self.spec_info.num_classes)

    def _metrics(self, model: nn.Module, norm: Normalization, splits=("val", "test", "lossless")) -> dict:
        out = {}
        model = model.to(self.device)
        for split in splits:
            ds = self.data[split]
            if ds is not None:
                out[f"{split}_top1"] = evaluate(model, make_eval_batches(ds, normalization=norm,
                                                                         device=self.device))["top1"]
        return out

    def _profile(self, model: nn.Module) -> dict:
        c = flops.count(model, self.input_size)
        return {"macs": c.macs, "params": c.params, "size_bytes": state_dict_bytes(model)}

    def _find_budget(self, model: nn.Module, scores: Any,
                     progress: Callable[[str], None] | None = None) -> BudgetResult:
        """The config's MACs or params target turned into rates (``hrank.budget.find_budget``)."""
        c = self.cfg
        metric = "macs" if c["target_macs"] is not None else "params"
        return find_budget(model, scores, target=c[f"target_{metric}"], metric=metric, max_rate=c["max_rate"],
                           order=c["budget_order"], round_to=c["round_to"], progress=progress, ignore=c["ignore"])

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
        model = models.create(c["model"], num_classes=self.num_classes)
        norm_name = c["normalization"]
        if c["checkpoint"]:
            extra = load_weights(model, c["checkpoint"])
            norm = Normalization.get(norm_name or extra.get("normalization") or "cifar")
            source = f"checkpoint {c['checkpoint']}"
        else:
            norm = Normalization.get(norm_name or self.spec_info.normalization)
            recipe = config.baseline_recipe(c)
            self.print(f"no checkpoint: training a baseline ({recipe.name}, {recipe.epochs} epochs)")
            torch.manual_seed(c["seed"])
            model = models.create(c["model"], num_classes=self.num_classes).to(self.device)
            data = self.data
            fit(model, make_train_batches(data["finetune"], recipe, normalization=norm, device=self.device,
                                          seed=c["seed"]),
                make_eval_batches(data["val"], normalization=norm, device=self.device) if data["val"] else None,
                recipe, out_dir=self.dir / "baseline_train", resume=True, progress=self.progress,
                select_on_test=data["val"] is None, printer=self.print,
                test_batches=None if data["val"] else make_eval_batches(data["test"], normalization=norm,
                                                                        device=self.device))
            source = f"trained here ({recipe.name}, {recipe.epochs} epochs)"
        model = model.cpu().eval()
        save_model(model, self.dir / "baseline.pt", arch=c["model"], normalization=norm)
        info = {"source": source, "normalization": norm.to_json(), **self._metrics(model, norm)}
        info.update(self._profile(model))
        atomic_write_json(self.dir / "baseline.json", info)
        self.print(f"baseline: {self._fmt_metrics(info)}")

    def _baseline_model(self) -> tuple[nn.Module, Normalization]:
        model, meta = load_model(self.dir / "baseline.pt")
        return model, Normalization.get(meta["normalization"])

    def _scores(self) -> None:
        c = self.cfg
        model, norm = self._baseline_model()
        if c["criterion"] == "hrank":
            if c["ranks"]:
                ranks = Ranks.load(c["ranks"], model=model)
                self.print(f"ranks from {c['ranks']} ({ranks.num_images} images)")
            else:
                ranks = compute_ranks(model, self.data["train"], num_images=c["rank_images"],
                                      batch_size=c["rank_batch_size"], device=self.device, progress=self.progress,
                                      augment=c["rank_augment"], seed=c["seed"], normalization=norm)
        else:
            convs = list(models.prunable_convs(model))
            scores = weight_scores(c["criterion"], model, convs, seed=c["seed"])
            ranks = Ranks(scores, 0, fingerprint=model_fingerprint(model), arch=c["model"],
                          meta={"criterion": c["criterion"], "seed": c["seed"]})
        ranks.save(self.dir / "scores.npz")

    def _spec(self) -> None:
        c = self.cfg
        model, _ = self._baseline_model()
        scores = Ranks.load(self.dir / "scores.npz", model=model)
        info: dict[str, Any] = {}
        if c["target_macs"] is not None or c["target_params"] is not None:
            result = self._find_budget(model, scores, progress=self.print)
            spec = result.spec
            info["budget"] = result.to_json()
            text = result.hrank_string()
            self.print(f"budget: {result.describe()}")
            self.print(f"rates found: {text}" if text else "rates found: see spec.json")
        elif c["compress_rate"] is not None:
            spec = Spec.from_string(model, c["compress_rate"]).without(model, c["ignore"] or ())
        else:
            from hrank.spec import parse_mapping_string

            rates = parse_mapping_string(c["rates"]) if isinstance(c["rates"], str) else c["rates"]
            spec = Spec.from_mapping(model, rates, ignore=c["ignore"] or ())
        for note in spec.notes:
            self.print(f"note: {note}")
        try:
            info["compress_rate"] = spec.to_hrank_string()
        except HRankError:
            info["compress_rate"] = None
        info["spec"] = spec.to_json()
        atomic_write_json(self.dir / "spec.json", info)
        if info["compress_rate"]:
            atomic_write_text(self.dir / "compress_rate.txt", info["compress_rate"] + "\n")

    def _spec_obj(self, model: nn.Module) -> Spec:
        return Spec.from_json(self._read("spec.json")["spec"], model)

    def _plan(self) -> None:
        c = self.cfg
        model, _ = self._baseline_model()
        scores = Ranks.load(self.dir / "scores.npz", model=model)
        plan = make_plan(model, scores, self._spec_obj(model), criterion=c["criterion"], coupling=c["coupling"],
                         width_rule=c["width_rule"])
        plan.save(self.dir / "plan.json")
        self.print(plan.summary())
        for line in plan.skipped_lines(limit=20):
            self.print(f"skipped: {line}")

    def _prune(self) -> None:
        c = self.cfg
        model, norm = self._baseline_model()
        spec = self._spec_obj(model)
        rule = {k: {"macs": v.macs, "params": v.params} for k, v in hrank_rule_counts(model, spec).items()}
        plan = Plan.load(self.dir / "plan.json")
        pruned = apply_plan(model, plan, mode=c["mode"])
        info: dict[str, Any] = {"hrank_rule": rule, "mode": c["mode"]}
        info["after_prune"] = self._metrics(pruned, norm, ("val",))
        if c["recalibrate"]:
            from hrank.data import Batches

            pruned = pruned.to(self.device)
            train = self.data["train"]
            batches = Batches(train, min(128, c["recalibrate_images"], len(train)), normalization=norm, train=True,
                              drop_last=False, device=self.device, seed=c["seed"] + 2)
            used = recalibrate_bn(pruned, batches, c["recalibrate_images"])
            info["recalibrated_on"] = used
            info["after_recalibration"] = self._metrics(pruned, norm, ("val",))
        pruned = pruned.cpu().eval()
        info.update(flops.count(pruned, self.input_size).to_json())
        info.pop("layers")
        save_model(pruned, self.dir / "pruned.pt", normalization=norm)
        atomic_write_json(self.dir / "prune.json", info)
        msg = f"pruned ({c['mode']}): {flops.format_count(info['macs'])} MACs, {flops.format_count(info['params'])} " \
              f"params; val top-1 {info['after_prune'].get('val_top1', float('nan')):.2f}% right after pruning"
        if c["recalibrate"]:
            msg += f", {info['after_recalibration'].get('val_top1', float('nan')):.2f}% after BN recalibration"
        self.print(msg)

    def _finetune(self) -> None:
        c = self.cfg
        recipe = config.finetune_recipe(c)
        data = self.data
        norm = Normalization.get(self._read("baseline.json")["normalization"])
        val = make_eval_batches(data["val"], normalization=norm, device=self.device) if data["val"] else None
        test = make_eval_batches(data["test"], normalization=norm, device=self.device)
        train = make_train_batches(data["finetune"], recipe, normalization=norm, device=self.device,
                                   seed=c["seed"])
        out = self.dir / "finetune"
        torch.manual_seed(c["seed"])
        if recipe.layerwise:
            from hrank.layerwise import fit_layerwise

            base, _ = self._baseline_model()
            _, result = fit_layerwise(base.to(self.device), Plan.load(self.dir / "plan.json"), train, val, recipe,
                                   out_dir=out, mode=c["mode"], resume=True, test_batches=test,
                                   select_on_test=c["select_on_test"] or val is None, progress=self.progress,
                                   printer=self.print)
        else:
            model, _ = load_model(self.dir / "pruned.pt")
            result = fit(model.to(self.device), train, val, recipe, out_dir=out, resume=True, test_batches=test,
                         select_on_test=c["select_on_test"] or val is None, progress=self.progress,
                         printer=self.print)
        atomic_write_json(self.dir / "finetune.json", {"recipe": recipe.to_json(), **result.to_json()})
        atomic_save_with(self.dir / "model.pt", lambda tmp: shutil.copyfile(out / "model.pt", tmp))

    def _evaluate(self) -> None:
        model, meta = load_model(self.dir / "model.pt")
        norm = Normalization.get(meta["normalization"])
        info = self._metrics(model, norm)
        info.update(self._profile(model))
        if self.cfg["latency"]:
            baseline, _ = self._baseline_model()
            lat = self._latency({"baseline": baseline, "final": model})
            info.update(lat["final"])
            info["baseline_latency"] = lat["baseline"]
        atomic_write_json(self.dir / "final.json", info)
        self.print(f"fine-tuned: {self._fmt_metrics(info)}")

    def _export(self) -> None:
        from hrank.export import export_onnx, export_torchscript

        model, _ = load_model(self.dir / "model.pt")
        info = {}
        for fmt in self.cfg["export"]:
            if fmt == "onnx":
                check = export_onnx(model, self.dir / "model.onnx", self.input_size)
            else:
                check = export_torchscript(model, self.dir / "model.torchscript.pt", self.input_size)
            info[fmt] = {"path": Path(check.path).name, "max_abs_diff": check.max_abs_diff, "ok": check.ok}
            self.print(f"exported {fmt}: {Path(check.path).name} (max |diff| vs PyTorch {check.max_abs_diff:.1e})")
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
            curves = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
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
        if "budget" in spec_info:
            b = spec_info["budget"]
            facts["budget"] = (f"target {flops.format_count(b['target'])} {b['metric']}, achieved "
                               f"{flops.format_count(b['achieved'])} ({b['error']:.2%} off), widths in multiples "
                               f"of {b.get('round_to', 1)}")
        test_key = "test_top1"
        headline = (f"{c['model']}: {flops.format_count(base['macs'])} -> {flops.format_count(final['macs'])} MACs, "
                    f"test top-1 {base.get(test_key, float('nan')):.2f}% -> {final.get(test_key, float('nan')):.2f}%")
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

    def _execute(self) -> dict[str, Any]:
        t0 = time.perf_counter()
        self._stage("baseline", ["baseline.pt", "baseline.json"], self._baseline)
        self._stage("scores", ["scores.npz"], self._scores)
        self._stage("spec", ["spec.json"], self._spec)
        self._stage("plan", ["plan.json"], self._plan)
        self._stage("prune", ["pruned.pt", "prune.json"], self._prune)
        self._stage("finetune", ["finetune.json", "model.pt"], self._finetune)
        self._stage("evaluate", ["final.json"], self._evaluate)
        formats = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
        self._stage("export", ["export.json"] + [formats[f] for f in self.cfg["export"]], self._export)
        self._stage("report", ["summary.json", "report.md", "report.html"], self._report)
        self.print(f"done in {time.perf_counter() - t0:.0f} s: {self.dir}")
        return self.summary()


def run(cfg: dict[str, Any], run_dir: str | os.PathLike, *, force: bool = False, progress: bool = True,
        printer: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or continue) the whole pipeline for a resolved config (``hrank.config.resolve``)."""
    return Run(cfg, run_dir, force=force, progress=progress, printer=printer).execute()

