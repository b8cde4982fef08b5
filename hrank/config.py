"""``hrank run`` configuration: one flat YAML mapping, every key also a command-line flag.

Each key has a type, a default and a help text (shown by ``hrank run --help``). Unknown keys and wrong
types are one-line errors that name the key and, for YAML files, the line. ``baseline`` and ``finetune``
are mappings of training-recipe keys (see ``hrank.recipes``), with an optional ``recipe`` preset name.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hrank import recipes
from hrank.errors import HRankError
from hrank.io import load_yaml_mapping


@dataclass(frozen=True)
class Key:
    """One configuration key: accepted types, default, help, and allowed values."""

    types: tuple[type, ...]
    default: Any
    help: str
    choices_from: tuple[str, ...] | Callable[[], Sequence[str]] | None = None  # fixed, or a registry's names
    affects_results: bool = True  # False for keys that may change between runs of one run directory
    # a key with affects_results=False that does determine the results while this other key is set (not None)
    affects_results_with: str | None = None

    @property
    def choices(self) -> tuple[str, ...] | None:
        c = self.choices_from
        return tuple(c()) if callable(c) else c


def _datasets() -> list[str]:
    from hrank import datasets

    return datasets.names()


def _criteria() -> list[str]:
    from hrank import criteria

    return criteria.names()


def _exporters() -> list[str]:
    from hrank import export

    return export.names()


def _latency_runtimes() -> tuple[str, ...]:
    from hrank.latency import RUNTIMES

    return RUNTIMES


KEYS: dict[str, Key] = {
    # what to prune
    "model": Key((str,), None, "the model: a registry name (hrank info), torchvision:NAME, timm:NAME or "
                               "package.module:factory (your own; weights from 'checkpoint')"),
    "num_classes": Key((int, type(None)), None, "classifier width (default: the dataset's)"),
    "checkpoint": Key((str, type(None)), None, "trained baseline weights; none: train a baseline first "
                                               "(see 'baseline')"),
    "normalization": Key((str, type(None)), None, "input normalization: cifar or imagenet (default: what an hrank "
                                                   "checkpoint carries, else cifar)", ("cifar", "imagenet")),
    # data
    "dataset": Key((str,), "cifar10", "dataset: cifar10, cifar100, or imagefolder (data_dir/train and "
                                      "data_dir/val with one folder per class, e.g. ImageNet)", _datasets),
    "data_dir": Key((str, type(None)), None, "dataset folder (default: $HRANK_DATA or ./data)",
                    affects_results=False),
    "download": Key((bool,), True, "download CIFAR when absent (needs a network)", affects_results=False),
    "val_size": Key((int, type(None)), None, "validation images carved from the training set for model "
                                             "selection (default: the dataset's: 5000 for CIFAR)"),
    "image_size": Key((int,), 224, "image folders: training crop and evaluation crop size"),
    "resize_size": Key((int,), 256, "image folders: evaluation resize before the centre crop"),
    "workers": Key((int,), 4, "image folders: decoding processes per data loader", affects_results=False),
    "train_subset": Key((int, type(None)), None, "train (baseline) and fine-tune on only this many training "
                                                 "images (quick runs)"),
    "test_subset": Key((int, type(None)), None, "evaluate on only the first N test images (quick runs)"),
    "lossless_test": Key((str, type(None)), None, "an extra CIFAR-format test batch file to report accuracy on "
                                                  "(e.g. exact-pixel images)"),
    "seed": Key((int,), 0, "seed for splits, image order, augmentation and initialisation"),
    "device": Key((str,), "auto", "auto (CUDA when present), cpu, cuda, cuda:N", affects_results=False),
    # baseline training (only without a checkpoint)
    "baseline": Key((dict,), {}, "recipe keys for training a baseline when there is no checkpoint "
                                 "(e.g. {recipe: scratch, epochs: 30})"),
    # scoring
    "criterion": Key((str,), "hrank", "filter score: hrank (feature-map rank), l1 (weight norm) or random",
                     _criteria),
    "ranks": Key((str, type(None)), None, "use this ranks file (hrank rank --out, or imported official ranks) "
                                          "instead of computing ranks"),
    "rank_images": Key((int,), 500, "images whose feature maps are ranked (the paper's g)"),
    "rank_batch_size": Key((int,), 128, "batch size of rank generation"),
    "rank_augment": Key((bool,), True, "use training augmentation for the ranking images, as HRank did"),
    # how much
    "compress_rate": Key((str, type(None)), None, "HRank's list syntax, one rate per entry, e.g. [0.1]+[0.6]*35+..."),
    "rates": Key((dict, str, type(None)), None, "rates by layer name or glob pattern, {pattern: rate} "
                                                "(or 'pat=0.5,pat2=0.3' on the command line)"),
    "ignore": Key((list, str, type(None)), None, "convs to leave alone, with every group they are coupled into: "
                                                "glob patterns over conv names (a list, or 'pat,pat2')"),
    "target_macs": Key((float, int, str, type(None)), None, "find rates that keep this many MACs: a fraction "
                                                            "of the baseline (0.5) or a count (62M)"),
    "target_params": Key((float, int, str, type(None)), None, "as target_macs, for parameters"),
    "target_latency": Key((float, type(None)), None, "find rates whose pruned, BN-folded model runs in this fraction "
                                                     "of the dense model's latency measured on this machine "
                                                     "(latency_runtime, latency_target_batch, latency_layout)"),
    "latency_runtime": Key((str,), "torch", "runtime a latency target is measured on: torch (eager), torchscript "
                                            "(traced and frozen, as exported), onnxruntime", _latency_runtimes),
    "latency_target_batch": Key((int,), 1, "batch size a latency target is measured at"),
    "latency_threads": Key((int, type(None)), None, "CPU threads a latency target is measured with (default: "
                                                    "torch's)"),
    "max_rate": Key((float,), 0.9, "largest rate a budget search may give one group"),
    "budget_order": Key((str,), "coupled", "order in which a budget search takes channels: coupled (shared "
                                           "streams pruned more slowly), uniform (same rate everywhere), score, or "
                                           "capacity (coupled, keeping channels with many params per MAC)",
                        ("coupled", "uniform", "score", "capacity")),
    "round_to": Key((int,), 8, "a target_macs/target_params search keeps pruned widths at multiples of this (fast "
                               "kernels); 1 = exact channels (not with target_latency: its widths come from the "
                               "measurement)"),
    # pruning
    "mode": Key((str,), "physical", "physical (remove channels) or mask (HRank's zero masks, shapes unchanged)",
                ("physical", "mask")),
    "coupling": Key((str,), "groups", "groups (one kept set per coupled group) or independent (per conv; mask "
                                      "mode only, reproduces HRank's masks)", ("groups", "independent")),
    "width_rule": Key((str,), "mean", "how a coupled group's rate comes from its members' rates",
                      ("mean", "min", "max")),
    "recalibrate": Key((bool,), True, "re-estimate BatchNorm statistics after pruning"),
    "recalibrate_images": Key((int,), 512, "training images used for BN recalibration"),
    # fine-tuning
    "finetune": Key((dict,), {}, "recipe keys for fine-tuning, with an optional preset: {recipe: fast, epochs: 30}"),
    "select_on_test": Key((bool,), False, "select the best epoch on the TEST set (biased; the official code did)"),
    # outputs
    "latency": Key((bool,), True, "measure inference latency of the baseline and the pruned model",
                   affects_results=False),
    "latency_batch": Key((int,), 128, "batch size of the batched latency measurement", affects_results=False),
    "latency_layout": Key((str,), "channels_last", "memory format of the latency measurement and of a latency "
                                                  "target's: channels_last (the fast layout for CNN inference on "
                                                  "CPU) or nchw",
                          ("channels_last", "nchw"), affects_results=False,
                          affects_results_with="target_latency"),  # with a target it decides the rates
    "export": Key((list, str), ["onnx", "torchscript"], "export formats for the final model: onnx, torchscript",
                  affects_results=False),
}

_RECIPE_KEYS = ("baseline", "finetune")


def _type_name(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping",
             list: "a list", type(None): "null"}
    return " or ".join(names[t] for t in types)


def check_value(key: str, value: Any, where: str = "") -> Any:
    """Validate one value against the schema; return it (ints accepted where floats are)."""
    if key not in KEYS:
        raise HRankError(f"unknown config key {key!r}{where}; valid keys: {', '.join(KEYS)}")
    spec = KEYS[key]
    if float in spec.types and str not in spec.types:
        value = recipes.number_from_text(value)
    ok = isinstance(value, spec.types) and not (isinstance(value, bool) and bool not in spec.types)
    if not ok and float in spec.types and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise HRankError(f"config key {key!r}{where} must be {_type_name(spec.types)}, got {value!r}")
    if spec.choices and value is not None and value not in spec.choices:
        raise HRankError(f"config key {key!r}{where} must be one of {', '.join(spec.choices)}, got {value!r}")
    if key == "export":
        formats = [f.strip() for f in value.split(",") if f.strip()] if isinstance(value, str) else list(value)
        known = _exporters()
        bad = [f for f in formats if f not in known]
        if bad:
            raise HRankError(f"config key 'export'{where}: unknown format {bad[0]!r} ({', '.join(known)})")
        value = formats
    if key in _RECIPE_KEYS:
        preset = value.get("recipe", "scratch" if key == "baseline" else "fast")
        if not isinstance(preset, str):
            raise HRankError(f"config key '{key}.recipe'{where} must be a preset name")
        recipes.apply_overrides(recipes.get_preset(preset), {k: v for k, v in value.items() if k != "recipe"},
                                f"'{key}'{where}")
    return value


def _key_lines(text: str) -> dict[str, int]:
    """Line number of each top-level key in a YAML mapping (for error messages)."""
    import yaml

    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def load_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a run config file (YAML or JSON)."""
    path = Path(path)
    data, text = load_yaml_mapping(path, "config file")
    lines = _key_lines(text)
    return {key: check_value(key, value, f" ({path.name} line {lines.get(key, '?')})") for key, value in data.items()}


def resolve(file_values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Defaults <- config file <- flags; recipe mappings are merged key by key. Validates the result."""
    cfg = {k: (dict(v.default) if isinstance(v.default, dict) else v.default) for k, v in KEYS.items()}
    for source in (file_values, overrides):
        for key, value in source.items():
            value = check_value(key, value, "" if source is file_values else " (command line)")
            if key in _RECIPE_KEYS:
                cfg[key] = {**cfg[key], **value}
            else:
                cfg[key] = value
    if not cfg["model"]:
        raise HRankError("config key 'model' is required (e.g. model: resnet_56)")
    chosen = [k for k in ("compress_rate", "rates", "target_macs", "target_params", "target_latency")
              if cfg[k] is not None]
    if not chosen:
        raise HRankError("say how much to prune: compress_rate, rates, target_macs, target_params or target_latency")
    if sum(k.startswith("target") for k in chosen) > 1:
        raise HRankError("give one target: target_macs, target_params or target_latency")
    if any(k.startswith("target") for k in chosen) and ("compress_rate" in chosen or "rates" in chosen):
        raise HRankError("a budget (target_macs/target_params/target_latency) replaces compress_rate/rates: give one "
                         "or the other")
    if cfg["target_latency"] is not None and not 0 < cfg["target_latency"] < 1:
        raise HRankError(f"target_latency is a fraction of the dense latency in (0, 1), got {cfg['target_latency']}")
    if cfg["latency_threads"] is not None and cfg["latency_threads"] < 1:
        raise HRankError(f"config key 'latency_threads' must be >= 1, got {cfg['latency_threads']}")
    for key in ("rank_images", "rank_batch_size", "recalibrate_images", "latency_batch", "round_to", "image_size",
                "resize_size", "latency_target_batch"):
        if cfg[key] < 1:
            raise HRankError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    for key in ("train_subset", "test_subset", "num_classes"):
        if cfg[key] is not None and cfg[key] < 1:
            raise HRankError(f"config key {key!r} must be >= 1, got {cfg[key]}")
    given = {*file_values, *overrides}
    _check_latency_keys(cfg, given)
    search = [k for k in ("max_rate", "budget_order", "round_to") if k in given]
    if search and all(cfg[k] is None for k in ("target_macs", "target_params", "target_latency")):
        keys = "/".join(search)
        raise HRankError(f"{keys} {'tunes' if len(search) == 1 else 'tune'} a target_macs/target_params/"
                         f"target_latency search; compress_rate/rates are used as they are: drop {keys} or give a "
                         "target")
    for key in ("seed", "val_size", "workers"):
        if cfg[key] is not None and cfg[key] < 0:
            raise HRankError(f"config key {key!r} must be >= 0, got {cfg[key]}")
    from hrank.imagefolder import MAX_WORKERS

    if cfg["workers"] > MAX_WORKERS:
        raise HRankError(f"config key 'workers' must be a whole number from 0 to {MAX_WORKERS}, got {cfg['workers']}")
    if cfg["seed"] >= 1 << 63:
        raise HRankError(f"config key 'seed' must be < 2**63, got {cfg['seed']}")
    if cfg["val_size"] == 0 and not cfg["select_on_test"]:
        raise HRankError("val_size 0 leaves no validation split to select the best epoch on: give one (e.g. "
                         "val_size 5000) or set select_on_test (biased: selects on the test set)")
    if not 0 < cfg["max_rate"] < 1:
        raise HRankError(f"config key 'max_rate' must be in (0, 1), got {cfg['max_rate']}")
    if cfg["coupling"] == "independent" and cfg["mode"] != "mask":
        raise HRankError("coupling 'independent' keeps different channels in coupled convs: only mode 'mask' "
                         "can apply it")
    return cfg


def _check_latency_keys(cfg: dict[str, Any], given: set[str]) -> None:
    """The latency keys' bounds (those of ``hrank.latency.LatencySetup``), and the keys a latency target cannot
    honour: ``round_to`` (``given`` are the keys the file or the flags set) and mode ``mask``."""
    from hrank.latency import MAX_BATCH, MAX_THREADS

    for key, top in (("latency_batch", MAX_BATCH), ("latency_target_batch", MAX_BATCH),
                     ("latency_threads", MAX_THREADS)):
        if cfg[key] is not None and cfg[key] > top:
            raise HRankError(f"config key {key!r} must be a whole number from 1 to {top}, got {cfg[key]}")
    if cfg["target_latency"] is None:
        return
    if "round_to" in given:
        raise HRankError("round_to does not apply to target_latency: a latency search keeps only the widths it "
                         "measured faster than every wider one (docs/pruning.md, section 3c); drop round_to")
    if cfg["mode"] == "mask":
        raise HRankError("target_latency times the physically pruned model, but mode 'mask' keeps every channel "
                         "(zeroed) and runs at the dense model's speed; use mode physical, or a target_macs budget "
                         "for masks")


def finetune_recipe(cfg: dict[str, Any]) -> recipes.Recipe:
    """The fine-tuning recipe: the ``finetune`` mapping's preset (default ``fast``) with its overrides."""
    values = dict(cfg["finetune"])
    preset = values.pop("recipe", "fast")
    return recipes.apply_overrides(recipes.get_preset(preset), values, "'finetune'").validate()


def baseline_recipe(cfg: dict[str, Any]) -> recipes.Recipe:
    """The baseline-training recipe (only used without a checkpoint): default preset ``scratch``."""
    values = dict(cfg["baseline"])
    preset = values.pop("recipe", "scratch")
    return recipes.apply_overrides(recipes.get_preset(preset), values, "'baseline'").validate()


def identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The keys that determine a run's results (a run directory belongs to one identity)."""
    def counts(key: str) -> bool:
        spec = KEYS[key]
        return spec.affects_results or (spec.affects_results_with is not None
                                        and cfg.get(spec.affects_results_with) is not None)

    return {k: v for k, v in cfg.items() if counts(k)}
