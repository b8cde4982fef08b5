"""Zoo coverage: the whole HRank pipeline on every torchvision classification CNN and 45 timm CNNs (29 families).

Each model is built with random weights (nothing is downloaded), its BatchNorm statistics are set by a few
random batches in train mode, and then, on one torch thread:

1. ``hrank.ranks.compute_ranks`` ranks every conv it can hook on a handful of random images;
2. ``Spec.from_mapping(model, {"*": 0.3})`` rates every conv 0.3 and ``hrank.plan.make_plan`` makes the plan;
3. ``apply_plan`` prunes one copy physically and another in mask mode; the output shape must not change, the
   two must agree (relative L2 error <= 1e-4 on a random batch) and the physical MACs must drop;
4. ``hrank.save`` / ``hrank.load`` (with a builder of the fresh model) must give bit-identical outputs;
5. ``hrank.export.export_onnx`` must match PyTorch under onnxruntime (relative to the output scale).

The first stage that fails is the model's status. ``tests/test_zoo.py`` runs the same cases (one test per
model); this script writes the coverage table.

    python bench/zoo.py                              # markdown table to stdout
    python bench/zoo.py --write docs/zoo.md          # the table inside docs/zoo.md (between the markers)
    python bench/zoo.py --only tv/resnet18 timm/dla34 --source timm

Needs the ``vision`` extra plus timm and onnxruntime: ``pip install torch==2.14.1 torchvision==0.29.1
timm==1.0.31`` and ``pip install -e ".[dev,export]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import gc
import os
import platform
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

RATE = 0.3
NUM_IMAGES = 8
SIZE = 64
MAX_REL_ERR = 1e-4
TIMEOUT = 240.0  # seconds per model: a model stuck in dependency analysis fails instead of hanging the job
# Known slow failures get less (they fail either way; the CI budget is better spent elsewhere).
TIMEOUTS: dict[str, float] = {"timm/dpn68": 30.0}
# Transformers are not CNNs: the zoo leaves them out (they have no conv filters to rank beyond a patch stem).
TRANSFORMER_PREFIXES = ("vit_", "swin_", "maxvit_")

# Input side per model where 64x64 does not fit: inception needs 75x75; the largest networks run at 32x32 to
# keep the CI job within its time budget (the pipeline does not depend on the input size).
SIZES: dict[str, int] = {
    "tv/inception_v3": 75, "timm/inception_v3": 75,
}

# timm CNNs, small members of 29 families (defining modules), a few families with several members of different
# design (byobnet: ResNeXt/RepVGG/MobileOne/GENet; efficientnet: EfficientNet/MixNet/MnasNet/...). pretrained=False.
TIMM_MODELS = (
    "resnet18", "resnext26ts", "regnetx_002", "regnetz_005", "efficientnet_b0", "mobilenetv3_small_100",
    "mobilenetv4_conv_small", "mixnet_s", "densenet121", "dla34", "dpn68", "ghostnet_100", "hrnet_w18_small",
    "res2net50_14w_8s", "rexnet_100", "selecsls42b", "tinynet_e", "ese_vovnet19b_dw", "cspresnet50",
    "cs3darknet_s", "darknet53", "lcnet_050", "convnext_atto", "fbnetc_100", "mnasnet_100", "spnasnet_100",
    "resnest14d", "nf_resnet26", "repvgg_a0", "mobileone_s0", "hardcorenas_a", "gernet_s", "skresnet18",
    "ecaresnet26t", "xception41", "vgg11", "inception_v3", "repghostnet_050", "hgnetv2_b0", "starnet_s050",
    "inception_next_atto", "resnetv2_18", "resnetblur18", "tresnet_m", "gcresnet33ts",
)


@dataclass(frozen=True)
class ZooCase:
    """One model of the zoo: its id (``tv/<name>`` or ``timm/<name>``), family and input side."""

    id: str
    source: str
    name: str
    family: str
    size: int

    def build(self) -> nn.Module:
        """A fresh model with random weights (seeded: the same weights every call)."""
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.source == "torchvision":
                import torchvision

                kwargs: dict = {"weights": None, "num_classes": 10}
                if self.name in ("googlenet", "inception_v3"):
                    kwargs.update(aux_logits=False, init_weights=True)
                return torchvision.models.get_model(self.name, **kwargs)
            import timm

            return timm.create_model(self.name, pretrained=False, num_classes=10)


def revive_zero_init(model: nn.Module) -> list[str]:
    """Give every all-zero multiplicative parameter (not a bias) seeded random values; return their names.

    timm zero-initialises the last norm (or gain) of each residual branch (``zero_init_last``), so at init the
    branch outputs nothing, and a pruned network whose branches compute something else than the plan says would
    still match the masked one: the comparison would test nothing there. Gains and norm weights (1-D or scalar)
    get values in [0.5, 1.5], weight matrices N(0, 1 / fan_in)."""
    g = torch.Generator().manual_seed(4)
    revived = []
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or not p.is_floating_point() or p.numel() == 0 or p.any():
                continue
            if p.dim() <= 1:
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(1, p[0].numel()) ** 0.5)
            revived.append(name)
    return revived


def torchvision_cases() -> list[ZooCase]:
    """Every classification model torchvision lists, minus the transformers."""
    import torchvision

    names = [n for n in torchvision.models.list_models(module=torchvision.models)
             if not n.startswith(TRANSFORMER_PREFIXES)]
    return [ZooCase(f"tv/{n}", "torchvision", n, torchvision.models.get_model_builder(n).__module__.split(".")[-1],
                    SIZES.get(f"tv/{n}", SIZE)) for n in names]


def timm_cases() -> list[ZooCase]:
    """The timm models of :data:`TIMM_MODELS`; the family is the timm module defining them."""
    import timm

    return [ZooCase(f"timm/{n}", "timm", n, timm.models.model_entrypoint(n).__module__.split(".")[-1],
                    SIZES.get(f"timm/{n}", SIZE)) for n in TIMM_MODELS]


class StageFailure(Exception):
    """The pipeline stopped at ``stage`` (build, ranks, spec, plan, physical, mask, compare, macs, save/load, onnx)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(f"{stage}: {message}")
        self.stage = stage
        self.message = message


@dataclass
class ZooResult:
    """What the pipeline measured for one model (filled stage by stage)."""

    case: ZooCase
    convs: int = 0
    ranked: int = 0
    groups: int = 0
    pruned_groups: int = 0
    skipped: int = 0
    skipped_reasons: dict[str, int] = field(default_factory=dict)
    macs_before: int = 0
    macs_after: int = 0
    rel_err: float | None = None
    onnx_diff: float | None = None
    onnx_scale: float | None = None
    onnx_exporter: str | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    failure: StageFailure | None = None

    @property
    def status(self) -> str:
        return "pass" if self.failure is None else f"{self.failure.stage}: {self.failure.message}"

    @property
    def mac_ratio(self) -> float | None:
        return self.macs_after / self.macs_before if self.macs_before and self.macs_after else None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


class _Timeout(BaseException):
    """Raised by the alarm of :func:`_deadline`; a BaseException so that no ``except Exception`` swallows it."""


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (SIGALRM; main thread on POSIX only, else no limit): a model that
    hangs in dependency analysis must not hang the whole job."""
    import signal
    import threading

    if not seconds or not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def ring(signum, frame):
        raise _Timeout(f"timed out after {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def _stage(result: ZooResult, name: str) -> Iterator[None]:
    """Time a stage; turn any exception (and the deadline) into a :class:`StageFailure` naming it."""
    start = time.perf_counter()
    try:
        yield
    except StageFailure:
        raise
    except _Timeout as e:
        raise StageFailure(name, str(e)) from None
    except Exception as e:
        raise StageFailure(name, _first_line(e)) from e
    finally:
        result.seconds[name] = result.seconds.get(name, 0.0) + time.perf_counter() - start


def calibrate_bn(model: nn.Module, size: int, *, batches: int = 2, batch: int = 8) -> nn.Module:
    """Give BatchNorm layers the statistics of random inputs (cumulative average over ``batches`` train-mode
    forward passes without gradients), then switch to eval mode: random-init networks then produce outputs of
    ordinary scale instead of the blow-up fresh (0, 1) statistics cause."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    g = torch.Generator().manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(batch, 3, size, size, generator=g))
    for m, momentum in zip(bns, momenta, strict=True):
        m.momentum = momentum
    return model.eval()


def _output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    if not isinstance(out, torch.Tensor):
        raise StageFailure("forward", f"the model returns {type(out).__name__}, not a tensor")
    return out


def _convs(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) for m in model.modules())


def reason_kinds(reason: str) -> list[str]:
    """The kinds of a skip reason, without layer names and widths, so that the table can count them: a plan's
    reason names the convs of its group ("layer1.0.conv1 reaches the group through ..."; "(a (64), b (128))")."""
    kinds = []
    for part in reason.split("; "):
        while re.search(r"\([^()]*\)", part):  # innermost first: "(a (64), b (128))" -> "(...)"
            part = re.sub(r"\([^()]*\)", "\x00", part)
        part = part.replace("\x00", "(...)")
        part = re.sub(r"^\S+ reaches", "<conv> reaches", part)
        part = re.sub(r"(?<![\w.])\w+(?:\.\w+)+", lambda m: m[0] if m[0].startswith("hrank.") else "<conv>", part)
        if part not in kinds:
            kinds.append(part)
    return kinds


def _zeroed(model: nn.Module) -> nn.Module:
    """``model`` with every state_dict entry zeroed: an unpruned model of the same structure whose weights
    come only from what is loaded into it (a tensor the loader missed changes the outputs)."""
    with torch.no_grad():
        for v in model.state_dict().values():
            v.zero_()
    return model


def run_case(case: ZooCase, workdir: Path, *, rate: float = RATE, num_images: int = NUM_IMAGES,
             scores: str = "hrank", timeout: float | None = None) -> ZooResult:
    """Run the pipeline on one model; every measured value lands in the result, the first failing stage in
    ``result.failure`` (never raised).

    ``scores="random"`` replaces the ranks by seeded random scores (``hrank.criteria.random_scores``): it shows
    how far the rest of the pipeline gets on models whose convs cannot all be ranked yet. ``hrank.load`` gets,
    as its builder, the unpruned model with all weights zeroed (cheaper than a fresh random init of the
    largest networks, and stricter: any entry not loaded shows in the outputs). ``timeout`` (seconds; default
    :data:`TIMEOUTS` for the model, else :data:`TIMEOUT`) stops a model that takes too long, as a failure of the
    stage it was in.
    """
    result = ZooResult(case)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(num_images, 3, case.size, case.size, generator=g)
    batch = torch.randn(4, 3, case.size, case.size, generator=g)
    try:
        with _deadline(timeout or TIMEOUTS.get(case.id, TIMEOUT)):
            _run_stages(result, case, images, batch, rate, scores, workdir)
    except StageFailure as e:
        result.failure = e
    except _Timeout as e:  # between two stages
        result.failure = StageFailure("timeout", str(e))
    finally:
        gc.collect()
    return result


def _run_stages(result: ZooResult, case: ZooCase, images: torch.Tensor, batch: torch.Tensor, rate: float,
                scores: str, workdir: Path) -> None:
    import hrank
    from hrank import flops
    from hrank.criteria import random_scores
    from hrank.export import export_onnx
    from hrank.plan import make_plan
    from hrank.prune import apply_plan
    from hrank.ranks import compute_ranks
    from hrank.spec import Spec

    size, num_images, x1 = case.size, images.shape[0], images[:1]
    with _stage(result, "build"):
        model = case.build()
        revive_zero_init(model)  # every residual branch carries signal: the physical/mask comparison sees it
        model = calibrate_bn(model, size)
        result.convs = _convs(model)
        dense_out = _output(model, batch)
    with _stage(result, "ranks"):
        if scores == "random":
            ranks = random_scores(model)
            result.ranked = len(ranks)
        else:
            ranks = compute_ranks(model, images, num_images=num_images, batch_size=num_images, progress=False)
            result.ranked = len(ranks.scores)
    with _stage(result, "spec"):
        spec = Spec.from_mapping(model, {"*": rate})
    with _stage(result, "plan"):
        plan = make_plan(model, ranks, spec, example_input=x1)
        result.groups = len(plan.groups)
        result.pruned_groups = len(plan.pruned_groups())
        skipped = getattr(plan, "skipped", None) or []
        result.skipped = len(skipped)
        for entry in skipped:
            for reason in reason_kinds(str(entry.get("reason", "?"))):
                result.skipped_reasons[reason] = result.skipped_reasons.get(reason, 0) + 1
        if not result.pruned_groups:
            raise StageFailure("plan", "nothing to prune: no group loses a channel")
    with _stage(result, "physical"):
        physical = apply_plan(copy.deepcopy(model), plan, example_input=x1).eval()
        phys_out = _output(physical, batch)
        if phys_out.shape != dense_out.shape:
            raise StageFailure("physical", f"output shape {tuple(phys_out.shape)} != {tuple(dense_out.shape)}")
    with _stage(result, "mask"):
        masked = apply_plan(copy.deepcopy(model), plan, mode="mask", example_input=x1).eval()
        mask_out = _output(masked, batch)
        del masked
        result.rel_err = float((phys_out - mask_out).norm() / mask_out.norm().clamp_min(1e-12))
        if not result.rel_err <= MAX_REL_ERR:
            raise StageFailure("mask", f"physical and mask outputs differ: relative L2 error "
                                       f"{result.rel_err:.2e} > {MAX_REL_ERR:g}")
    with _stage(result, "macs"):
        result.macs_before = flops.count(model, (3, size, size)).macs
        result.macs_after = flops.count(physical, (3, size, size)).macs
        if not result.macs_after < result.macs_before:
            raise StageFailure("macs", f"MACs did not drop ({result.macs_after} vs {result.macs_before})")
    with _stage(result, "save/load"):
        path = hrank.save(physical, workdir / f"{case.name}.pt")
        dense = [model]  # the builder takes the last reference: the unpruned model is freed with the load
        del model
        loaded, _ = hrank.load(path, builder=lambda: _zeroed(dense.pop()))
        path.unlink()
        same = torch.equal(_output(loaded, batch), phys_out)
        del loaded
        if not same:
            raise StageFailure("save/load", "the loaded model's outputs differ from the saved model's")
    with _stage(result, "onnx"):
        onnx_path = workdir / f"{case.name}.onnx"
        try:
            check = export_onnx(physical, onnx_path, (3, size, size))
            result.onnx_diff, result.onnx_scale = check.max_abs_diff, check.output_scale
            result.onnx_exporter = "torchscript"
        except hrank.HRankError as e:
            if "ONNX export failed" not in str(e):
                raise
            # the TorchScript exporter hrank uses cannot express some ops at small inputs (adaptive pooling
            # to a size that does not divide the input): torch's dynamo exporter can
            result.onnx_diff, result.onnx_scale = onnx_dynamo(physical, onnx_path, size)
            result.onnx_exporter = "dynamo"
        finally:
            onnx_path.unlink(missing_ok=True)


def onnx_dynamo(model: nn.Module, path: Path, size: int) -> tuple[float, float]:
    """Export with torch's dynamo ONNX exporter (dynamic batch), run it in onnxruntime on a random batch of 3;
    return (max abs difference, output scale) and raise when the difference exceeds hrank.export's tolerance."""
    import io

    import numpy as np
    import onnxruntime as ort

    from hrank.export import ONNX_ATOL

    model.eval()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, size, size, generator=g)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x2 = torch.randn(3, 3, size, size, generator=g)
    ref = _output(model, x2).numpy()
    got = session.run(None, {"input": x2.numpy()})[0]
    diff, scale = float(np.abs(ref - got).max()), float(np.abs(ref).max())
    if not diff <= ONNX_ATOL * max(1.0, scale / 10.0):
        raise StageFailure("onnx", f"dynamo ONNX output differs from PyTorch by {diff:.2e} (scale {scale:.2g})")
    return diff, scale


# ---------------------------------------------------------------------------------------------------------
# The coverage table
# ---------------------------------------------------------------------------------------------------------

BEGIN, END = "<!-- zoo-table:begin -->", "<!-- zoo-table:end -->"


def _row(r: ZooResult) -> str:
    ratio = f"{r.mac_ratio:.2f}" if r.mac_ratio is not None else "-"
    status = "pass" if r.failure is None else f"**{r.failure.stage}**: {r.failure.message}".replace("|", "\\|")
    if r.failure is None and r.onnx_exporter == "dynamo":
        status = "pass (ONNX: dynamo exporter)"
    groups = f"{r.pruned_groups}/{r.groups}" if r.groups else "-"
    if r.skipped:
        groups += f" ({r.skipped} convs skipped)"
    ranked = f"{r.ranked}/{r.convs}" if r.convs else "-"
    return (f"| {r.case.id} | {r.case.family} | {r.case.size} | {status} | {ranked} | {groups} | {ratio} | "
            f"{r.total_seconds:.1f} |")


def table(results: list[ZooResult]) -> str:
    """Markdown: one row per model, then the pass counts per source."""
    lines = ["| model | family | input | status | ranked / convs | pruned groups / groups | MAC ratio | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [_row(r) for r in results]
    lines.append("")
    for source in ("torchvision", "timm"):
        rs = [r for r in results if r.case.source == source]
        if rs:
            passed = sum(r.failure is None for r in rs)
            lines.append(f"- {source}: {passed}/{len(rs)} pass, {sum(r.total_seconds for r in rs):.0f} s")
    skips = [r for r in results if r.skipped_reasons]
    if skips:
        lines += ["", "Convs the plan left unpruned although the spec rated them (partial specs): how many convs "
                      "each reason was given for (a conv can have several):", ""]
        for r in skips:
            ordered = sorted(r.skipped_reasons.items(), key=lambda t: -t[1])
            reasons = "; ".join(f"{reason} ({n})" for reason, n in ordered)
            lines.append(f"- {r.case.id}, {r.skipped} convs: {reasons}")
    return "\n".join(lines)


def _hrank_revision() -> str:
    """``hrank <version> at <commit>`` (``+ changes`` when hrank/ differs from it), from git where available."""
    import subprocess

    import hrank

    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hrank"], cwd=root, capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return f"hrank {hrank.__version__}"
    return f"hrank {hrank.__version__} at {commit}{' + changes' if dirty else ''}"


def environment() -> str:
    """One line: date, machine, versions."""
    import torchvision

    try:
        import timm
        timm_version = timm.__version__
    except ImportError:
        timm_version = "absent"
    return (f"{datetime.date.today().isoformat()}, {_hrank_revision()}, {platform.machine()} {os.cpu_count()}-core "
            f"CPU VM, {torch.get_num_threads()} torch thread(s), Python {platform.python_version()}, torch "
            f"{torch.__version__}, torchvision {torchvision.__version__}, timm {timm_version}")


def write_into(doc: Path, text: str) -> None:
    """Replace the part of ``doc`` between the table markers with ``text`` (the rest is hand-written)."""
    body = doc.read_text(encoding="utf-8")
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers")
    head, rest = body.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=["torchvision", "timm", "all"], default="all")
    ap.add_argument("--only", nargs="+", default=None, help="model ids (tv/resnet18, timm/dla34)")
    ap.add_argument("--write", type=Path, default=None, help="put the table into this markdown file")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as in the tests)")
    ap.add_argument("--scores", choices=["hrank", "random"], default="hrank",
                    help="random: seeded random filter scores instead of ranks (how far the rest gets)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = ([] if args.source == "timm" else torchvision_cases()) + \
            ([] if args.source == "torchvision" else timm_cases())
    if args.only:
        cases = [c for c in cases if c.id in set(args.only)]
    results = []
    stdout = os.dup(1)
    os.dup2(2, 1)  # exporters print graphs straight to file descriptor 1: keep them out of the table
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for case in cases:
                r = run_case(case, Path(tmp), scores=args.scores)
                results.append(r)
                stages = " ".join(f"{k}={v:.1f}" for k, v in r.seconds.items())
                print(f"{case.id}: {r.status} ({r.total_seconds:.1f} s: {stages})", file=sys.stderr, flush=True)
    finally:
        sys.stdout.flush()
        os.dup2(stdout, 1)
        os.close(stdout)
    text = f"Measured {environment()}.\n\n{table(results)}"
    if args.write:
        write_into(args.write, text)
    else:
        print(text)
    return 0 if all(r.failure is None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ZooCase", "ZooResult", "StageFailure", "run_case", "torchvision_cases", "timm_cases", "calibrate_bn",
           "table"]
