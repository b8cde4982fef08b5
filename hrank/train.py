"""Train, fine-tune and evaluate: exact resume, model selection on a validation split, DDP via torchrun.

``fit`` runs one training job in a run directory::

    out_dir/config.json     recipe + run description (what identifies the run)
    out_dir/last.pt         full training state, rewritten atomically after every epoch
    out_dir/best.pt         the model with the best selection metric so far (validation top-1)
    out_dir/metrics.jsonl   one JSON line per epoch
    out_dir/summary.json    the final summary (best epoch, validation and test metrics, time)
    out_dir/model.pt        the selected model, saved with ``hrank.checkpoint.save`` (loadable by ``hrank eval``)

Why each piece is there:

- *Exact resume.* ``last.pt`` holds the model, optimizer, scheduler, gradient scaler, every RNG state, the
  epoch, the best metric and the configuration. Data order and augmentation depend only on ``(seed,
  epoch)`` (``hrank.data.Batches``), so an interrupted run resumed from ``last.pt`` ends bit-identical to
  an uninterrupted one on CPU. Files are written to a temporary name and renamed, so killing the process at
  any moment leaves the previous checkpoint intact.
- *Honest model selection.* The official code picked the best epoch on the test set. Here the best epoch
  is chosen on a validation split carved from the training set; selecting on test needs an explicit flag
  and is announced in the output and in ``summary.json``.
- *DDP.* Started by ``torchrun`` (``LOCAL_RANK``/``WORLD_SIZE``); each process trains on its shard of the
  global batch, metrics are summed over processes, and only rank 0 writes files or prints.

Layer-wise fine-tuning (the official HRank procedure) is ``hrank.layerwise.fit_layerwise``: one pruning step
at a time, each step a ``fit`` run in its own sub-directory, resumable at step granularity.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from hrank.checkpoint import build_from_record, load, load_state, model_record, save
from hrank.data import Batches, ImageSet, Normalization, Split
from hrank.distributed import DistInfo, init_distributed
from hrank.distributed import all_reduce as _all_reduce
from hrank.distributed import barrier as _barrier
from hrank.errors import HRankError
from hrank.io import _error_line, atomic_torch_save, atomic_write_json, atomic_write_text, load_torch_file
from hrank.modelcopy import copy_model
from hrank.prune import enforce_masks
from hrank.recipes import Recipe

__all__ = ["DistInfo", "FitResult", "NonFiniteLossError", "default_val_size", "evaluate", "fit", "init_distributed",
           "load_model_file", "lr_factor", "make_eval_batches", "make_train_batches", "model_state",
           "read_checkpoint", "save_model", "split_train_val", "summary_text"]

CHECKPOINT_FORMAT = "hrank-train-checkpoint"
CHECKPOINT_VERSION = 1
EVAL_BATCH_SIZE = 500  # evaluation holds no activations for backward; larger batches only cost memory


class NonFiniteLossError(HRankError):
    """The training loss became NaN or inf; the run stopped and its last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------------

def default_val_size(n_train: int) -> int:
    """5,000 images for the 50,000-image CIFAR training sets; a tenth of smaller training sets."""
    return min(5000, n_train // 10)


def split_train_val(train: ImageSet, val_size: int | None = None, seed: int = 0) -> tuple[ImageSet, ImageSet | None]:
    """Carve a seeded validation split from the training set (``val_size`` 0 gives no validation set)."""
    if val_size is None:
        val_size = default_val_size(len(train))
    if val_size == 0:
        return train, None
    from hrank.data import train_val_split

    tr, va = train_val_split(len(train), val_size, seed)
    return train.subset(tr, f"{train.name}[train]"), train.subset(va, f"{train.name}[val]")


def make_train_batches(data: Split, recipe: Recipe, *, normalization: Normalization | str | dict,
                       device: torch.device, seed: int = 0, dist: DistInfo | None = None) -> Any:
    """Training batches for ``recipe``: the global batch split over DDP processes, augmentation on device."""
    dist = dist or DistInfo.current()
    if recipe.batch_size % dist.world_size:
        raise HRankError(f"batch size {recipe.batch_size} is not divisible by the {dist.world_size} processes")
    if recipe.batch_size > len(data):
        raise HRankError(f"batch size {recipe.batch_size} is larger than the training set ({len(data)} images)")
    return data.train_batches(recipe.batch_size // dist.world_size, normalization=normalization, device=device,
                              seed=seed, rank=dist.rank, world_size=dist.world_size,
                              channels_last=_use_channels_last(recipe, device))


def make_eval_batches(data: Split, *, normalization: Normalization | str | dict, device: torch.device,
                      batch_size: int = EVAL_BATCH_SIZE) -> Any:
    """Unshuffled, unaugmented batches over the whole set (``fit`` shards them itself under DDP)."""
    return data.eval_batches(batch_size, normalization=normalization, device=device)


def _shard_eval(batches: Any, dist: DistInfo) -> Any:
    """Each process evaluates a contiguous, disjoint slice, so summed counts cover every image once."""
    if batches is None or not dist.enabled:
        return batches
    return batches.shard(dist.rank, dist.world_size)


# ---------------------------------------------------------------------------------------------------
# Precision, memory format, schedule
# ---------------------------------------------------------------------------------------------------

def _resolve_amp(recipe: Recipe, device: torch.device) -> torch.dtype | None:
    if recipe.amp == "off" or (recipe.amp == "auto" and device.type != "cuda"):
        return None
    if recipe.amp == "fp16":
        return torch.float16
    if recipe.amp == "auto" and not torch.cuda.is_bf16_supported():
        return None
    return torch.bfloat16


def _use_channels_last(recipe: Recipe, device: torch.device) -> bool:
    return recipe.channels_last == "on" or (recipe.channels_last == "auto" and device.type == "cuda")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def lr_factor(recipe: Recipe, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the peak lr at optimizer step ``s`` (0-based); the scheduler steps once per batch.

    Multistep decays at whole epochs exactly as ``MultiStepLR`` stepped per epoch does (the official
    recipes); warm-up ramps linearly per step from 1/warmup_steps to 1.
    """
    total = recipe.epochs * steps_per_epoch
    warm = int(round(recipe.warmup_epochs * steps_per_epoch))
    final = recipe.final_lr_fraction

    def factor(step: int) -> float:
        w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
        if recipe.schedule == "multistep":
            epoch = step // steps_per_epoch
            return w * recipe.gamma ** sum(1 for m in recipe.milestones if epoch >= m)
        if step < warm:
            return w
        progress = min(1.0, (step - warm) / max(1, total - warm))
        if recipe.schedule == "cosine":
            return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return final + (1.0 - final) * (1.0 - progress)  # linear

    return factor


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def distill_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, *, weight: float,
                 temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """(1 - w) * cross-entropy(student, targets) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T)),
    batch-mean (Hinton et al. 2015: T^2 keeps the soft term's gradients on the scale of the hard one's)."""
    hard = nn.functional.cross_entropy(student, targets, label_smoothing=label_smoothing)
    soft = nn.functional.kl_div(nn.functional.log_softmax(student / temperature, dim=1),
                                nn.functional.log_softmax(teacher / temperature, dim=1), reduction="batchmean",
                                log_target=True)
    return (1.0 - weight) * hard + weight * temperature ** 2 * soft


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
             num_classes: int | None = None, amp: torch.dtype | None = None,
             all_reduce: bool = False) -> dict[str, Any]:
    """Top-1 and top-5 accuracy (%), mean cross-entropy and per-class accuracy (%) of ``model``.

    The model is put in eval mode and its mode restored. ``all_reduce`` sums the counts over DDP
    processes (each having evaluated a disjoint shard). ``per_class`` is None for a class with no images.
    Non-finite outputs are an error (a "loss nan" would be silent garbage).
    """
    was_training = model.training
    model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    totals = None
    try:
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            try:
                with _autocast(device, amp):
                    out = model(x)
            except HRankError:
                raise
            except Exception as e:  # the model cannot take these images: one line, not a traceback
                raise HRankError(f"model failed on images of shape {tuple(x.shape)} ({_error_line(e)})") from None
            out = out.float()
            c = num_classes or out.shape[1]
            if totals is None:
                totals = {"nonfinite": torch.zeros((), dtype=torch.long, device=device),
                          "loss": torch.zeros((), dtype=torch.float64, device=device),
                          "top1": torch.zeros((), dtype=torch.long, device=device),
                          "top5": torch.zeros((), dtype=torch.long, device=device),
                          "class_total": torch.zeros(c, dtype=torch.long, device=device),
                          "class_correct": torch.zeros(c, dtype=torch.long, device=device)}
            totals["nonfinite"] += (~torch.isfinite(out)).any(dim=1).sum()  # summed, not synced per batch
            totals["loss"] += nn.functional.cross_entropy(out, y, reduction="sum").double()
            topk = out.topk(min(5, out.shape[1]), dim=1).indices
            hit = topk == y[:, None]
            top1 = hit[:, 0]
            totals["top1"] += top1.sum()
            totals["top5"] += hit.any(dim=1).sum()
            totals["class_total"] += torch.bincount(y, minlength=c)[:c]
            totals["class_correct"] += torch.bincount(y[top1], minlength=c)[:c]
    finally:
        model.train(was_training)
    if totals is None:
        raise HRankError("evaluation set is empty")
    if all_reduce:
        dist = DistInfo.current()
        for t in totals.values():
            _all_reduce(t, dist)
    n = int(totals["class_total"].sum())
    if int(totals["nonfinite"]):
        raise HRankError(f"the model's outputs are not finite (NaN or inf) on {int(totals['nonfinite'])} of {n} "
                         "images: its weights or BatchNorm statistics are broken; no metrics computed")
    cls_total = totals["class_total"].tolist()
    cls_correct = totals["class_correct"].tolist()
    return {
        "top1": 100.0 * int(totals["top1"]) / n,
        "top5": 100.0 * int(totals["top5"]) / n,
        "loss": float(totals["loss"]) / n,
        "per_class": [100.0 * k / t if t else None for k, t in zip(cls_correct, cls_total, strict=True)],
        "count": n,
    }


# ---------------------------------------------------------------------------------------------------
# Model records, RNG states, run identity
# ---------------------------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def model_state(model: nn.Module, normalization: Normalization | None = None) -> dict[str, Any]:
    """``{"record": hrank.checkpoint.model_record(...), "state_dict": ...}``: what rebuilds a (pruned) model."""
    model = _unwrap(model)
    return {"record": model_record(model, normalization=normalization), "state_dict": model.state_dict()}


def _structure(model: nn.Module) -> list[list]:
    """Names and shapes of every state entry: identifies a (possibly pruned) network's structure."""
    return [[k, list(v.shape)] for k, v in model.state_dict().items()]


def fingerprint(obj: Any) -> str:
    """Short, stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), int(pos), int(has_gauss), float(gauss)))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint (``last.pt``/``best.pt``) safely (``weights_only``); one-line errors."""
    ckpt = load_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise HRankError(f"{path} is not an hrank training checkpoint")
    if ckpt.get("version", 0) > CHECKPOINT_VERSION:
        raise HRankError(f"{path} was written by a newer hrank (checkpoint version {ckpt['version']})")
    return ckpt


def _identity(model: nn.Module, recipe: Recipe, run_info: dict[str, Any]) -> dict:
    record = model_record(model)
    return {"model": {"arch": record.get("arch"), "structure": fingerprint(_structure(model))},
            "plan": fingerprint(record["plan"]) if record.get("plan") is not None else None,
            "mode": record.get("mode"),
            "recipe": {k: v for k, v in recipe.to_json().items() if k != "name"},
            "data": run_info}


def _differences(saved: dict, current: dict) -> str:
    keys = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    text = ", ".join(f"{k} ({saved.get(k)!r} vs {current.get(k)!r})" for k in keys[:4])
    return text + (f" +{len(keys) - 4} more" if len(keys) > 4 else "")


def _check_identity(saved: dict, current: dict, run_dir: Path) -> None:
    """Refuse to resume a run directory made for another model, plan, recipe or data; say what differs."""
    diffs = []
    if saved["model"] != current["model"]:
        diffs.append(f"model ({saved['model'].get('arch')} vs {current['model'].get('arch')}, "
                     f"{'same' if saved['model']['structure'] == current['model']['structure'] else 'different'}"
                     " layer shapes)")
    if saved["plan"] != current["plan"] or saved.get("mode") != current.get("mode"):
        diffs.append(f"plan ({saved['plan']}/{saved.get('mode')} vs {current['plan']}/{current.get('mode')})")
    if saved["recipe"] != current["recipe"]:
        diffs.append("recipe " + _differences(saved["recipe"], current["recipe"]))
    if saved["data"] != current["data"]:
        diffs.append("data " + _differences(saved["data"], current["data"]))
    if diffs:
        raise HRankError(f"cannot resume {run_dir}: it was started with another " + "; ".join(diffs)
                         + " (nothing was changed; use another output directory)")


# ---------------------------------------------------------------------------------------------------
# fit
# ---------------------------------------------------------------------------------------------------

@dataclass
class FitResult:
    """What a run produced: the selected epoch, its metrics and where the files are."""

    best_epoch: int
    best_metric: float
    selected_on: str
    val: dict[str, Any] | None
    test: dict[str, Any] | None
    epochs_run: int
    seconds: float
    completed: bool
    out_dir: Path

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["out_dir"] = str(self.out_dir)
        return d


class _Log:
    """Rank-0 output: printed lines, metrics.jsonl and (when installed) TensorBoard."""

    def __init__(self, out_dir: Path, enabled: bool, printer: Callable[[str], None], tensorboard: bool) -> None:
        self.enabled = enabled
        self.printer = printer
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def print(self, msg: str) -> None:
        if self.enabled:
            self.printer(msg)

    def truncate(self, last_epoch: int) -> None:
        """On resume, drop lines of epochs after the checkpoint (they are about to be re-run)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                if ln.strip() and json.loads(ln).get("epoch", 0) <= last_epoch]
        atomic_write_text(self.path, "".join(ln + "\n" for ln in keep))

    def record(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _fmt_time(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class _Trainer:
    """The mutable state of one run (model, DDP wrapper, optimizer, scheduler, scaler) and one epoch's loop."""

    def __init__(self, model: nn.Module, recipe: Recipe, steps_per_epoch: int, device: torch.device,
                 dist: DistInfo, teacher: nn.Module | None = None) -> None:
        self.recipe, self.device, self.dist = recipe, device, dist
        self.teacher = teacher
        self.steps_per_epoch = steps_per_epoch
        self.amp = _resolve_amp(recipe, device)
        self.channels_last = _use_channels_last(recipe, device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
            if teacher is not None:
                teacher.to(memory_format=torch.channels_last)
        from hrank.syncbn import convert_sync_bn, has_batchnorm, use_sync_bn

        per_process = recipe.batch_size // max(dist.world_size, 1)
        self.sync_bn = use_sync_bn(recipe.sync_bn, model, per_process, dist.world_size)
        if self.sync_bn:  # BatchNorm statistics over the global batch, as one process computes them
            model = convert_sync_bn(model, device)
        if dist.enabled and dist.is_main:
            print(f"SyncBN {'on' if self.sync_bn else 'off'} (sync_bn: {recipe.sync_bn}, {per_process} images per "
                  f"process{', no BatchNorm' if not has_batchnorm(model) else ''})")
        self.model = model
        # DDP wraps the already pruned model; the optimizer is built after, on the final parameters
        self.net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled else model
        self.optimizer = torch.optim.SGD(model.parameters(), lr=recipe.effective_lr, momentum=recipe.momentum,
                                         nesterov=recipe.nesterov, weight_decay=recipe.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(recipe, steps_per_epoch))
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
        # host syncs cost GPU time (they stall the queue); on CPU there is nothing to overlap
        self.sync_every = 1 if device.type == "cpu" else 25

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict()}

    def restore(self, ckpt: dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"]["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        rng = ckpt["rng"]
        _set_rng_state(rng[self.dist.rank] if self.dist.rank < len(rng) else rng[0])

    def train_epoch(self, batches: Batches, epoch: int, progress: bool) -> dict[str, float]:
        """One pass over ``batches``; returns loss, top-1, images/s, time and the lr used (summed over DDP)."""
        from tqdm import tqdm

        recipe, device, dist = self.recipe, self.device, self.dist
        batches.set_epoch(epoch)
        self.net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen, lr_used = 0, self.optimizer.param_groups[0]["lr"]
        finite: list[torch.Tensor] = []  # per step since the last host sync
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False,
                   disable=not (progress and dist.is_main), dynamic_ncols=True, file=sys.stderr, unit="batch")
        try:
            for step, (x, y) in enumerate(batches):
                if self.channels_last and not x.is_contiguous(memory_format=torch.channels_last):
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(device, self.amp):
                    out = self.net(x)
                    if self.teacher is None:
                        loss = self.criterion(out.float(), y)
                    else:
                        with torch.no_grad():
                            soft = self.teacher(x).float()
                        loss = distill_loss(out.float(), soft, y, weight=recipe.distill_weight,
                                            temperature=recipe.distill_temperature,
                                            label_smoothing=recipe.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                enforce_masks(self.model)  # mask mode: pruned filters stay exactly zero
                lr_used = self.optimizer.param_groups[0]["lr"]
                self.scheduler.step()
                loss = loss.detach()
                finite.append(torch.isfinite(loss))
                loss_sum += loss.double() * y.shape[0]
                correct += (out.detach().argmax(1) == y).sum()
                seen += y.shape[0]
                if (step + 1) % self.sync_every == 0 or step + 1 == self.steps_per_epoch:
                    self._check_finite(finite, step, epoch, loss)
                    if not bar.disable:
                        rate = seen * dist.world_size / max(time.perf_counter() - t0, 1e-9)
                        bar.set_postfix_str(f"loss {float(loss_sum) / seen:.3f} acc {100 * int(correct) / seen:.1f}% "
                                            f"lr {lr_used:.3g} {rate:.0f} img/s", refresh=False)
                bar.update(1)
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        stats = _all_reduce(torch.stack([loss_sum, correct.double(),
                                         torch.tensor(float(seen), dtype=torch.float64, device=device)]), dist)
        if dist.enabled:  # without SyncBatchNorm each process has its own running statistics: use rank 0's
            for buf in self.model.buffers():
                tdist.broadcast(buf, 0)
        n = float(stats[2])
        return {"train_loss": float(stats[0]) / n, "train_top1": 100.0 * float(stats[1]) / n,
                "images_per_s": n / seconds, "epoch_s": seconds, "lr": lr_used}

    def _check_finite(self, finite: list[torch.Tensor], step: int, epoch: int, loss: torch.Tensor) -> None:
        """Stop at the first non-finite loss on any process (all processes agree: one collective)."""
        flags = _all_reduce(torch.stack(finite).to(torch.int32), self.dist, tdist.ReduceOp.MIN).cpu()
        if bool(flags.all()):
            finite.clear()
            return
        bad = step + 1 - len(finite) + int((flags == 0).nonzero()[0])
        kind = "nan" if math.isnan(float(loss)) else "inf" if math.isinf(float(loss)) else "non-finite"
        raise NonFiniteLossError(
            f"loss became {kind} at epoch {epoch + 1}, step {bad + 1} of {self.steps_per_epoch}; training "
            f"stopped, " + (f"the last good checkpoint (epoch {epoch}) is kept" if epoch > 0 else
                            "no checkpoint had been written yet") + " (try a lower lr or check the data)")


def fit(model: nn.Module, train_batches: Batches, val_batches: Batches | None, recipe: Recipe, *,
        out_dir: str | os.PathLike, resume: bool = False, overwrite: bool = False,
        test_batches: Batches | None = None, select_on_test: bool = False,
        run_info: dict[str, Any] | None = None, stop_after_epoch: int | None = None,
        progress: bool = True, tensorboard: bool = True, save_final: bool = True,
        teacher: nn.Module | None = None, printer: Callable[[str], None] = print) -> FitResult:
    """Train ``model`` with ``recipe``, selecting the best epoch on ``val_batches``; evaluate it on test.

    With ``recipe.distill_weight`` > 0, ``teacher`` (the unpruned model; frozen, in eval mode) is distilled into
    ``model`` (``distill_loss``); its weights are part of the run's identity, so a resume with another
    teacher is refused.

    ``model`` is already pruned (physical or mask) and on its device; under DDP it is the same on every
    process, and ``fit`` wraps it in DDP and only then builds the optimizer. ``train_batches`` is this
    process's shard (see ``make_train_batches``). ``val_batches``/``test_batches`` cover whole sets; under
    DDP ``fit`` evaluates disjoint slices and sums the counts.

    ``resume`` continues from ``out_dir/last.pt`` exactly, after checking that it belongs to the same model,
    plan, recipe and data (``run_info``). ``stop_after_epoch=k`` ends the run after epoch ``k`` as if it had
    been interrupted there (a later ``resume`` continues it). Model selection on the test set happens only
    with ``select_on_test=True`` (and is announced). On return the model holds the selected weights.
    """
    dist = DistInfo.current()
    out_dir = Path(out_dir)
    run_info = _check_fit_inputs(train_batches, val_batches, test_batches, recipe, select_on_test, run_info, dist)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    teacher = _prepare_teacher(teacher, recipe, device)
    if teacher is not None:
        run_info = {**run_info, "teacher": _weights_fingerprint(teacher)}
    normalization = train_batches.norm
    identity = _identity(model, recipe, run_info)
    last_path, best_path = out_dir / "last.pt", out_dir / "best.pt"

    ckpt = None
    if last_path.exists() and not resume and not overwrite:
        raise HRankError(f"{out_dir} already holds a run (last.pt): pass --resume to continue it or --force "
                         "to start over")
    if resume and last_path.exists():
        ckpt = read_checkpoint(last_path)
        _check_identity(ckpt["identity"], identity, out_dir)

    trainer = _Trainer(model, recipe, len(train_batches), device, dist, teacher)  # may refuse: before any write
    model = trainer.model
    start_epoch, best_metric, best_epoch, best_val, best_test, elapsed_before = 0, -math.inf, 0, None, None, 0.0
    best_state: dict[str, torch.Tensor] | None = None
    pending: _PendingBest | None = None
    if ckpt is not None:
        start_epoch, elapsed_before = int(ckpt["epoch"]), float(ckpt.get("elapsed", 0.0))
        best_metric, best_epoch, best_val = float(ckpt["best_metric"]), int(ckpt["best_epoch"]), ckpt["best_val"]
        best_test = ckpt.get("best_test")
        best_state, pending = _resume_best(best_path, ckpt, dist.is_main)
        trainer.restore(ckpt)
        if ckpt.get("world_size", 1) != dist.world_size and dist.is_main:
            printer(f"note: resuming a {ckpt.get('world_size', 1)}-process run with {dist.world_size} "
                    "process(es): data shards differ, so the result will not be bit-identical")
        del ckpt
    elif resume and dist.is_main:
        printer(f"no checkpoint in {out_dir}; starting a new run")
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    _barrier(dist)

    log = _Log(out_dir, dist.is_main, printer, tensorboard)
    if dist.is_main:
        atomic_write_json(out_dir / "config.json", {
            "recipe": recipe.to_json(), "effective_lr": recipe.effective_lr, "run": run_info,
            "world_size": dist.world_size, "device": str(device), "amp": _dtype_name(trainer.amp),
            "channels_last": trainer.channels_last, "torch": torch.__version__})
        log.truncate(start_epoch)
        if select_on_test:
            log.print("WARNING: model selection uses the TEST set (--select-on-test); the reported test "
                      "accuracy is optimistically biased")
        log.print(f"{'resuming at' if start_epoch else 'starting'} epoch {start_epoch + 1}/{recipe.epochs}: "
                  f"recipe {recipe.name}, lr {recipe.effective_lr:g}, global batch {recipe.batch_size} x "
                  f"{len(train_batches)} steps{f' on {dist.world_size} processes' if dist.enabled else ''}, "
                  f"{device}{', ' + _dtype_name(trainer.amp) + ' autocast' if trainer.amp else ''}"
                  f"{', channels_last' if trainer.channels_last else ''}")

    val_eval, test_eval = _shard_eval(val_batches, dist), _shard_eval(test_batches, dist)
    t_start = time.perf_counter()
    epoch, completed = start_epoch, True
    try:
        for epoch in range(start_epoch, recipe.epochs):
            if stop_after_epoch is not None and epoch >= stop_after_epoch:
                completed = False
                break
            row = {"epoch": epoch + 1, **trainer.train_epoch(train_batches, epoch, progress)}
            val = evaluate(model, val_eval, amp=trainer.amp, all_reduce=dist.enabled) if val_eval else None
            test = evaluate(model, test_eval, amp=trainer.amp, all_reduce=dist.enabled) if select_on_test else None
            metric = (test if select_on_test else val)["top1"]
            improved = metric > best_metric
            if improved:
                best_metric, best_epoch, best_val, best_test = metric, epoch + 1, val, test
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if pending is not None and epoch + 1 >= pending.epoch:
                pending.check(improved, epoch + 1)  # the re-run epoch must become the best again
                pending = None
            for prefix, m in (("val", val), ("test", test)):
                if m is not None:
                    row.update({f"{prefix}_loss": m["loss"], f"{prefix}_top1": m["top1"], f"{prefix}_top5": m["top5"]})
            rng = _gather_rng(dist)
            if dist.is_main:
                state = model_state(model, normalization)
                common = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "epoch": epoch + 1,
                          "model": state, "plan": state["record"]["plan"], "recipe": recipe.to_json(),
                          "identity": identity}
                # Order matters, so that a kill after any write resumes (see _resume_best): the metrics line
                # first (a resume drops lines after last.pt's epoch), then last.pt (holding the best epoch's
                # number and metrics), then best.pt, which may lag last.pt by this epoch: then last.pt's
                # weights are the best ones and best.pt is rewritten from them.
                log.record(row)
                atomic_torch_save({**common, "kind": "last", **trainer.state(), "rng": rng,
                                   "best_metric": best_metric, "best_epoch": best_epoch, "best_val": best_val,
                                   "best_test": best_test, "selected_on": run_info["selected_on"],
                                   "world_size": dist.world_size,
                                   "elapsed": elapsed_before + time.perf_counter() - t_start}, last_path)
                if improved:
                    atomic_torch_save(_best_record(common, metric, val, test, run_info["selected_on"]), best_path)
                log.print(_epoch_line(row, recipe.epochs, best_metric, best_epoch, "test" if select_on_test else "val"))
            _barrier(dist)
        else:
            epoch = recipe.epochs
    finally:
        log.close()

    if best_state is not None:
        model.load_state_dict(best_state)
    result = FitResult(best_epoch=best_epoch, best_metric=best_metric if best_epoch else float("nan"),
                       selected_on=run_info["selected_on"], val=best_val, test=None, epochs_run=epoch,
                       seconds=elapsed_before + time.perf_counter() - t_start, completed=completed, out_dir=out_dir)
    if not completed:
        log.print(f"stopped after epoch {epoch} of {recipe.epochs} (continue with --resume)")
        return result
    if test_eval is not None:  # in float32 whatever the recipe's autocast, like `hrank eval`
        result.test = evaluate(model, test_eval, all_reduce=dist.enabled)
    if dist.is_main:
        if save_final:
            save_model(model, out_dir / "model.pt", normalization=normalization,
                       extra={"best_epoch": best_epoch, "selected_on": result.selected_on, "val": best_val,
                              "test": result.test})
        atomic_write_json(out_dir / "summary.json", result.to_json())
        log.print(summary_text(result, val_batches, test_batches))
    _barrier(dist)
    return result


def _prepare_teacher(teacher: nn.Module | None, recipe: Recipe, device: torch.device) -> nn.Module | None:
    """A frozen eval-mode copy of the teacher on ``device`` when the recipe distills (None otherwise).

    A copy, so the caller's model keeps its device, mode and ``requires_grad`` (it may be trained or pruned
    again later: freezing it in place once made a later student untrainable)."""
    if recipe.distill_weight <= 0:
        return None
    if teacher is None:
        raise HRankError("the recipe distills (distill_weight > 0) but no teacher was given: distillation learns "
                         "from the unpruned model (hrank run uses the baseline; hrank finetune takes --teacher)")
    teacher = copy_model(teacher).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _weights_fingerprint(model: nn.Module) -> str:
    """A hash of the names, shapes and values of every parameter and buffer (the teacher's identity)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _check_fit_inputs(train_batches: Batches, val_batches: Batches | None, test_batches: Batches | None,
                      recipe: Recipe, select_on_test: bool, run_info: dict[str, Any] | None,
                      dist: DistInfo) -> dict[str, Any]:
    """Validate the data against the recipe and the process group; complete the run description."""
    if val_batches is None and not select_on_test:
        raise HRankError("no validation split to select the best epoch on: give one (e.g. --val-size 5000) or "
                         "pass --select-on-test to select on the test set")
    if select_on_test and test_batches is None:
        raise HRankError("--select-on-test needs a test set")
    if train_batches.world_size != dist.world_size:
        raise HRankError(f"training batches are sharded for {train_batches.world_size} processes, "
                         f"but this job has {dist.world_size}")
    if len(train_batches) == 0:
        raise HRankError(f"batch size {recipe.batch_size} is larger than the training set")
    info = dict(run_info or {})
    info.setdefault("global_batch", train_batches.batch_size * dist.world_size)
    info.setdefault("train_images", len(train_batches.data))
    info.setdefault("val_images", len(val_batches.data) if val_batches is not None else 0)
    info["selected_on"] = "test" if select_on_test else "val"
    if info["global_batch"] != recipe.batch_size:
        raise HRankError(f"training batches hold {info['global_batch']} images per step but the recipe's "
                         f"batch_size is {recipe.batch_size}")
    return info


def _best_record(common: dict[str, Any], metric: float, val: dict | None, test: dict | None,
                 selected_on: str) -> dict[str, Any]:
    """best.pt's content: the checkpoint fields of the best epoch plus its selection metric and metrics."""
    return {**common, "kind": "best", "metric": metric, "val": val, "test": test, "selected_on": selected_on}


@dataclass
class _PendingBest:
    """best.pt written by an older hrank *before* last.pt: it holds the epoch about to be re-run, whose
    re-run (bit-identical on CPU) makes it the best again; only if it does not is the selection lost."""

    epoch: int
    best_epoch: int
    path: Path

    def check(self, improved: bool, epoch: int) -> None:
        if not (improved and epoch == self.epoch):
            raise HRankError(f"{self.path} held epoch {self.epoch}, whose re-run did not reproduce it (not "
                             f"bit-identical on this device), and epoch {self.best_epoch}'s weights are gone; "
                             "cannot resume the model selection: start over with --force")


def _resume_best(best_path: Path, ckpt: dict[str, Any], is_main: bool
                 ) -> tuple[dict[str, torch.Tensor] | None, _PendingBest | None]:
    """The best epoch's weights for a run resumed from ``ckpt`` (last.pt), and a pending check if any.

    best.pt is derived: when a kill came between last.pt and best.pt, the best epoch is last.pt's own
    epoch, so its weights are last.pt's and best.pt is rewritten from them.
    """
    best_epoch, epoch = int(ckpt["best_epoch"]), int(ckpt["epoch"])
    if best_epoch == 0:
        return None, None
    best = read_checkpoint(best_path) if best_path.exists() else None
    held = int(best.get("epoch", -1)) if best is not None else None
    if held == best_epoch:
        return best["model"]["state_dict"], None
    if best_epoch == epoch:  # killed after last.pt, before best.pt
        state = ckpt["model"]["state_dict"]
        if is_main:
            common = {k: ckpt[k] for k in ("format", "version", "epoch", "model", "plan", "recipe", "identity")}
            atomic_torch_save(_best_record(common, float(ckpt["best_metric"]), ckpt["best_val"],
                                           ckpt.get("best_test"), ckpt.get("selected_on", "val")), best_path)
        return dict(state), None
    if held == epoch + 1 and float(best.get("metric", -math.inf)) > float(ckpt["best_metric"]):
        return None, _PendingBest(held, best_epoch, best_path)  # an older hrank wrote best.pt first
    raise HRankError(f"{best_path} is {'missing' if best is None else f'of epoch {held}'} but last.pt's best epoch "
                     f"is {best_epoch}; cannot resume the model selection (restore best.pt or start over with --force)")


def _gather_rng(dist: DistInfo) -> list[dict[str, Any]] | None:
    """Every process's RNG states, collected on rank 0 (None elsewhere)."""
    if not dist.enabled:
        return [_rng_state()]
    states: list[Any] | None = [None] * dist.world_size if dist.is_main else None
    tdist.gather_object(_rng_state(), states, dst=0)
    return states


def _dtype_name(dtype: torch.dtype | None) -> str:
    return str(dtype).replace("torch.", "") if dtype is not None else "off"


def _epoch_line(row: dict[str, Any], epochs: int, best: float, best_epoch: int, sel: str) -> str:
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} top-1 {row['train_top1']:.2f}%"
            + (f"  val loss {row['val_loss']:.4f} top-1 {row['val_top1']:.2f}%" if "val_top1" in row else "")
            + (f"  test top-1 {row['test_top1']:.2f}%" if "test_top1" in row else "")
            + f"  best {sel} {best:.2f}% @{best_epoch}  lr {row['lr']:.3g}  {row['images_per_s']:.0f} img/s  "
            f"{_fmt_time(row['epoch_s'])}")


def summary_text(result: FitResult, val_batches: Batches | None = None, test_batches: Batches | None = None) -> str:
    """The final report of a run, in a few lines."""
    lines = [f"done: {result.epochs_run} epochs in {_fmt_time(result.seconds)}"]
    if result.val is not None:
        n = f" ({len(val_batches.data)} images held out of the training set)" if val_batches is not None else ""
        lines.append(f"  best validation top-1 {result.val['top1']:.2f}% at epoch {result.best_epoch}{n}"
                     if result.selected_on == "val" else
                     f"  validation top-1 {result.val['top1']:.2f}% at the selected epoch {result.best_epoch}")
    if result.selected_on == "test":
        lines.append(f"  WARNING: epoch {result.best_epoch} was SELECTED ON THE TEST SET (--select-on-test); "
                     "the test accuracy below is optimistically biased")
    if result.test is not None:
        n = f", {len(test_batches.data)} images" if test_batches is not None else ""
        lines.append(f"  test top-1 {result.test['top1']:.2f}%, top-5 {result.test['top5']:.2f}%, loss "
                     f"{result.test['loss']:.4f} (model of epoch {result.best_epoch}{n})")
    lines.append(f"  files in {result.out_dir}: model.pt (selected model), best.pt, last.pt, metrics.jsonl, "
                 "summary.json")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Model files
# ---------------------------------------------------------------------------------------------------

def save_model(model: nn.Module, path: str | os.PathLike, *, normalization: Normalization | None = None,
               extra: dict[str, Any] | None = None) -> Path:
    """Save the trained model with ``hrank.checkpoint.save`` (weights + plan + metadata, no pickled code)."""
    return save(_unwrap(model), path, normalization=normalization, extra=extra)


def load_model_file(path: str | os.PathLike, *, builder: Callable[[], nn.Module] | None = None,
                    arch: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a model from a file hrank wrote: ``hrank.checkpoint.save`` output (a run's model.pt, a pruned
    model) or a training checkpoint (best.pt/last.pt).

    Returns the model (registry architecture, or ``builder()`` for others, with its plan replayed and the
    weights loaded strictly) and what the file says about it: ``arch``, ``normalization``, ``plan``,
    ``mode``. Nothing but tensors and plain data is unpickled. With ``arch`` (the reference the user named), a
    file of another model is refused before anything is built.
    """
    obj = load_torch_file(path, "model file")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        state = obj.get("model")
        if not isinstance(state, dict) or "record" not in state or "state_dict" not in state:
            raise HRankError(f"{path} holds no model")
        record = state["record"]
        model = build_from_record(record, builder, arch=arch, source=str(path))
        load_state(model, state["state_dict"], record.get("state_metadata"))
        enforce_masks(model)
        model.eval()
        info = {k: record.get(k) for k in ("arch", "normalization", "plan", "mode")}
    else:
        model, meta = load(path, builder=builder, arch=arch)
        info = {k: meta.get(k) for k in ("arch", "normalization", "mode")}
        info["plan"] = meta["plan"].to_json() if meta.get("plan") is not None else None
    info["source"] = str(path)
    return model, info
