"""Training recipes: named presets of every fine-tuning hyperparameter, overridable from YAML and flags.

A recipe is a frozen dataclass; each field says what it controls and why it has its preset value, so a
run's ``config.json`` is the complete, readable record of how it was trained. Precedence, lowest first:
preset → YAML config file → command-line flags. Unknown keys and wrong types are one-line errors that
name the key (and, for unknown keys, list the valid ones).

Presets
-------
``hrank``      the official HRank fine-tuning (Lin et al. 2020, lmbxmu/HRank @ c03ac85): layer by layer,
               15 epochs per pruned layer, SGD 0.01 / 0.9 / 5e-4, MultiStepLR at 5 and 10, batch 128.
``hrankplus``  the successor's one-shot fine-tune (lmbxmu/HRankPlus @ bcdb51d): 150 epochs, SGD
               0.01 / 0.9 / 5e-4, MultiStepLR at 50 and 100, batch 256.
``fast``       ours, the default for ``hrank finetune``: one-shot, short, warm-up + cosine; see
               docs/training.md for the measurements behind each value.
``scratch``    baseline training from random initialisation (``hrank train``): the usual CIFAR recipe.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any

from hrank.errors import HRankError
from hrank.io import load_yaml_mapping

SCHEDULES = ("multistep", "cosine", "linear")
AMP_MODES = ("auto", "bf16", "fp16", "off")
TRISTATE = ("auto", "on", "off")
LAYERWISE_UNITS = ("auto", "conv", "block")


def _f(help: str, choices: tuple[str, ...] | None = None, **kw: Any):
    """A dataclass field carrying its help text (and choices) for the CLI and the error messages."""
    return field(metadata={"help": help, "choices": choices}, **kw)


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of a training or fine-tuning run (see the module docstring for presets)."""

    name: str = _f("preset this recipe started from (informational)", default="custom")
    epochs: int = _f("epochs of training; in layer-wise mode, epochs per pruning step", default=30)
    batch_size: int = _f("global batch size (split evenly across DDP processes)", default=256)
    lr: float = _f("peak learning rate (at lr_ref_batch images per batch when that is set)", default=0.01)
    lr_ref_batch: int = _f("when > 0, scale lr linearly by batch_size / lr_ref_batch (Goyal et al. 2017), "
                           "so changing the batch keeps the per-image step size; 0 uses lr as given", default=0)
    momentum: float = _f("SGD momentum", default=0.9)
    nesterov: bool = _f("Nesterov momentum", default=False)
    weight_decay: float = _f("L2 weight decay (SGD's coupled form, as in the official code)", default=5e-4)
    schedule: str = _f("learning-rate schedule after warm-up: multistep (× gamma at each milestone epoch), "
                       "cosine (to final_lr_fraction), linear (straight decay to final_lr_fraction)",
                       SCHEDULES, default="multistep")
    milestones: tuple[int, ...] = _f("epochs at which multistep multiplies the lr by gamma", default=())
    gamma: float = _f("multistep decay factor", default=0.1)
    warmup_epochs: float = _f("linear warm-up from 0 to the peak lr over this many epochs (per step)", default=0.0)
    final_lr_fraction: float = _f("lr at the end of cosine/linear decay, as a fraction of the peak", default=0.0)
    label_smoothing: float = _f("cross-entropy label smoothing", default=0.0)
    distill_weight: float = _f("knowledge distillation from the unpruned model (the teacher, in eval mode on the "
                               "same augmented batch): loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher || "
                               "student) on temperature-T softmaxes; 0 = off", default=0.0)
    distill_temperature: float = _f("softmax temperature T of the distillation term (Hinton et al. 2015)",
                                    default=4.0)
    layerwise: bool = _f("prune and fine-tune one conv (ResNet-50: one bottleneck) at a time, as HRank does; "
                         "otherwise apply the whole plan once (one-shot)", default=False)
    layerwise_unit: str = _f("layer-wise step: conv (one coupled group of convs), block (every group starting in "
                             "one residual block), auto (block for resnet_50, as HRank does, else conv)",
                             LAYERWISE_UNITS, default="auto")
    amp: str = _f("autocast precision: auto (bf16 on CUDA when supported, else off), bf16, fp16 (with a "
                  "gradient scaler), off", AMP_MODES, default="auto")
    channels_last: str = _f("NHWC memory format: auto (on CUDA only), on, off", TRISTATE, default="auto")
    sync_bn: str = _f("under DDP, BatchNorm batch statistics over the global batch instead of each process's "
                      "share (any device; see hrank.syncbn): auto (on when the model has BatchNorm and the "
                      "per-process batch is below 64 images: docs/benchmarks.md), on, off; true/false mean on/off",
                      TRISTATE, default="auto")

    @property
    def effective_lr(self) -> float:
        """The peak lr actually used: ``lr`` scaled to the batch size when ``lr_ref_batch`` is set."""
        return self.lr * self.batch_size / self.lr_ref_batch if self.lr_ref_batch > 0 else self.lr

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        return d

    def validate(self) -> Recipe:
        """Check value ranges; raise a one-line HRankError naming the key."""
        checks = [
            ("epochs", self.epochs >= 1, "must be >= 1"),
            ("batch_size", self.batch_size >= 1, "must be >= 1"),
            ("lr", math.isfinite(self.lr) and 0 < self.lr <= 1e4, "must be a number in (0, 10000]"),
            ("lr_ref_batch", self.lr_ref_batch >= 0, "must be >= 0"),
            ("momentum", 0 <= self.momentum < 1, "must be in [0, 1)"),
            ("weight_decay", math.isfinite(self.weight_decay) and 0 <= self.weight_decay <= 1e4,
             "must be a number in [0, 10000]"),
            ("gamma", 0 < self.gamma <= 1, "must be in (0, 1]"),
            ("warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, "must be in [0, epochs]"),
            ("final_lr_fraction", 0 <= self.final_lr_fraction <= 1, "must be in [0, 1]"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
            ("distill_weight", 0 <= self.distill_weight <= 1, "must be in [0, 1]"),
            ("distill_temperature", math.isfinite(self.distill_temperature) and self.distill_temperature > 0,
             "must be a finite number > 0"),
            ("milestones", all(m >= 1 for m in self.milestones)
             and list(self.milestones) == sorted(set(self.milestones)), "must be increasing positive epochs"),
            ("nesterov", not (self.nesterov and self.momentum == 0), "needs momentum > 0"),
        ]
        for key, ok, why in checks:
            if not ok:
                raise HRankError(f"recipe key {key!r} {why} (got {getattr(self, key)!r})")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise HRankError(f"recipe key {f.name!r} must be one of {', '.join(choices)} "
                                 f"(got {getattr(self, f.name)!r})")
        return self


PRESETS: dict[str, Recipe] = {
    # Official HRank (lmbxmu/HRank main_cifar.py): per pruned conv, 15 epochs with the lr divided by 10 at
    # epochs 5 and 10, each step continuing from the previous step's best model.
    "hrank": Recipe(name="hrank", epochs=15, batch_size=128, lr=0.01, momentum=0.9, nesterov=False,
                    weight_decay=5e-4, schedule="multistep", milestones=(5, 10), gamma=0.1, layerwise=True,
                    amp="off", channels_last="off"),
    # HRankPlus (lmbxmu/HRankPlus main/cifar): the pruned network is built once and fine-tuned 150 epochs.
    "hrankplus": Recipe(name="hrankplus", epochs=150, batch_size=256, lr=0.01, momentum=0.9, nesterov=False,
                        weight_decay=5e-4, schedule="multistep", milestones=(50, 100), gamma=0.1,
                        layerwise=False, amp="off", channels_last="off"),
    # Ours: a short one-shot fine-tune. The lr is 10x the official one: on a pruned ResNet-56 (~50% MACs)
    # lr 0.01 / 0.02 / 0.05 / 0.1 / 0.2 gave 80.5 / 82.2 / 83.6 / 84.4 / 83.9% test top-1 after the same 6
    # short epochs; warm-up + cosine beat the official step schedule at the same lr (83.6 vs 82.7%); label
    # smoothing 0.1 gave nothing (84.4 vs 84.5%). Runs and caveats: docs/training.md.
    "fast": Recipe(name="fast", epochs=30, batch_size=256, lr=0.1, lr_ref_batch=256, momentum=0.9,
                   nesterov=True, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
                   final_lr_fraction=0.0, label_smoothing=0.0, layerwise=False, amp="auto",
                   channels_last="auto"),
    # Training from scratch (He et al. 2016 style): lr 0.1 at batch 128, cosine over 200 epochs.
    "scratch": Recipe(name="scratch", epochs=200, batch_size=128, lr=0.1, lr_ref_batch=128, momentum=0.9,
                      nesterov=True, weight_decay=5e-4, schedule="cosine", warmup_epochs=1.0,
                      label_smoothing=0.0, layerwise=False, amp="auto", channels_last="auto"),
}

_FIELDS = {f.name: f for f in fields(Recipe)}
KEYS: tuple[str, ...] = tuple(k for k in _FIELDS if k != "name")


def get_preset(name: str) -> Recipe:
    """The named preset; a one-line error listing the presets otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise HRankError(f"unknown recipe {name!r}; choose one of {', '.join(PRESETS)}") from None


_NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def number_from_text(value: Any) -> Any:
    """``value`` as a float when it is a string holding a plain decimal number (YAML 1.1, which PyYAML reads,
    takes ``1e-3`` for a string: it wants ``1.0e-3``); anything else unchanged."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value.strip())
    return value


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check and convert one value to the field's type; errors name the key and where it came from."""
    kind = _FIELDS[key].type
    where = f" in {source}" if source else ""

    def bad(expected: str) -> HRankError:
        return HRankError(f"config key {key!r}{where} must be {expected}, got {value!r}")

    if kind in ("int", int):
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise bad("an integer")
        return value
    if kind in ("float", float):
        value = number_from_text(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        return float(value)
    if kind in ("bool", bool):
        if not isinstance(value, bool):
            raise bad("true or false")
        return value
    if kind in ("str", str):
        if not isinstance(value, str):
            if key in ("channels_last", "sync_bn") and isinstance(value, bool):  # YAML reads on/off as booleans
                # (and sync_bn was a boolean before it had auto: old configs and checkpoints say true/false)
                return "on" if value else "off"
            raise bad("a string")
        return value
    if "tuple" in str(kind):
        if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool)
                                                    for v in value):
            return tuple(value)
        raise bad("a list of integers")
    raise bad(str(kind))  # pragma: no cover - every field type is handled above


def apply_overrides(recipe: Recipe, values: dict[str, Any], source: str = "") -> Recipe:
    """Replace fields from ``values``; an unknown key is an error naming it and listing the valid keys."""
    changes = {}
    for key, value in values.items():
        if key not in KEYS:
            raise HRankError(f"unknown config key {key!r}{' in ' + source if source else ''}; "
                             f"valid keys: recipe, {', '.join(KEYS)}")
        changes[key] = _coerce(key, value, source)
    return dataclasses.replace(recipe, **changes)


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML (or JSON) mapping of recipe keys; an optional ``recipe:`` key names the base preset."""
    data, _ = load_yaml_mapping(path, "config file")
    return data


def resolve(preset: str | None = None, config: str | os.PathLike | None = None,
            overrides: dict[str, Any] | None = None, default: str = "fast") -> Recipe:
    """Build a recipe: ``preset`` (or the config's ``recipe:`` key, or ``default``) → config → overrides."""
    data = dict(load_config(config)) if config else {}
    base = data.pop("recipe", None)
    if base is not None and not isinstance(base, str):
        raise HRankError(f"config key 'recipe' in {config} must be a preset name ({', '.join(PRESETS)})")
    recipe = get_preset(preset or base or default)
    if data:
        recipe = apply_overrides(recipe, data, str(config))
    if overrides:
        recipe = apply_overrides(recipe, {k: v for k, v in overrides.items() if v is not None}, "flags")
    return recipe.validate()


def from_json(d: dict[str, Any]) -> Recipe:
    """Rebuild a recipe from ``Recipe.to_json`` output (checkpoints, config.json)."""
    d = dict(d)
    name = d.pop("name", "custom")
    return dataclasses.replace(apply_overrides(Recipe(), d, "checkpoint"), name=name)


def field_help(key: str) -> str:
    """The help text of a recipe key (used by the CLI flags)."""
    return _FIELDS[key].metadata["help"]


def field_choices(key: str) -> tuple[str, ...] | None:
    return _FIELDS[key].metadata.get("choices")


def field_type(key: str) -> str:
    t = _FIELDS[key].type
    return t if isinstance(t, str) else t.__name__
