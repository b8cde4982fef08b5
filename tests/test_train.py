"""Training: recipes and config errors, exact resume, NaN stop, evaluation numbers, selection gating, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from hrank import recipes, train
from hrank.cli import main
from hrank.data import ImageSet, Normalization, load_batch_files
from hrank.errors import HRankError

CPU = torch.device("cpu")


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool-linear: BN running stats, momentum buffers and a classifier, in milliseconds."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


def _recipe(**kw) -> recipes.Recipe:
    base = {"epochs": 4, "batch_size": 16, "lr": 0.05, "lr_ref_batch": 0}
    base.update(kw)
    return recipes.resolve("fast", overrides=base)


def _fit(sets, out, recipe, *, seed=0, model=None, **kw):
    tr, va, te = sets
    torch.manual_seed(seed)
    model = model or TinyNet()
    tb = train.make_train_batches(tr, recipe, normalization="cifar", device=CPU, seed=seed)
    vb = train.make_eval_batches(va, normalization="cifar", device=CPU)
    teb = train.make_eval_batches(te, normalization="cifar", device=CPU)
    kw.setdefault("progress", False)
    kw.setdefault("printer", lambda s: None)
    return model, train.fit(model, tb, vb, recipe, out_dir=out, test_batches=teb, **kw)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- recipes -----------------------------------------------------------------------------------------------

def test_presets_match_the_official_recipes():
    h = recipes.get_preset("hrank")
    assert (h.lr, h.momentum, h.weight_decay, h.milestones, h.gamma, h.epochs, h.batch_size, h.layerwise) == \
        (0.01, 0.9, 5e-4, (5, 10), 0.1, 15, 128, True)
    p = recipes.get_preset("hrankplus")
    assert (p.lr, p.milestones, p.epochs, p.batch_size, p.layerwise) == (0.01, (50, 100), 150, 256, False)
    for r in recipes.PRESETS.values():
        r.validate()
    assert recipes.resolve().name == "fast" and not recipes.resolve().layerwise


def test_schedules_step_exactly():
    h = recipes.get_preset("hrank")
    f = train.lr_factor(h, steps_per_epoch=10)
    assert [f(s) for s in (0, 49, 50, 99, 100, 149)] == [1.0, 1.0, pytest.approx(0.1), pytest.approx(0.1),
                                                          pytest.approx(0.01), pytest.approx(0.01)]
    fast = recipes.resolve("fast", overrides={"epochs": 10, "warmup_epochs": 2.0})
    g = train.lr_factor(fast, steps_per_epoch=5)
    assert g(0) == pytest.approx(0.1) and g(9) == 1.0  # linear warm-up over 10 steps
    assert g(10) == pytest.approx(1.0) and g(49) < 0.01  # then cosine to 0
    assert recipes.resolve("fast", overrides={"batch_size": 512}).effective_lr == pytest.approx(
        2 * recipes.get_preset("fast").lr)


def test_config_file_overrides_and_errors(tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("recipe: hrankplus\nepochs: 3\nlr: 0.05\nmilestones: [1, 2]\n")
    r = recipes.resolve(None, cfg, {"epochs": 5})
    assert (r.name, r.epochs, r.lr, r.milestones, r.batch_size) == ("hrankplus", 5, 0.05, (1, 2), 256)
    cfg.write_text("lrr: 0.1\n")
    with pytest.raises(HRankError, match=r"unknown config key 'lrr'.*valid keys: .*\blr\b"):
        recipes.resolve(None, cfg)
    cfg.write_text("lr: fast\n")
    with pytest.raises(HRankError, match=r"config key 'lr' .*must be a number"):
        recipes.resolve(None, cfg)
    cfg.write_text("milestones: 5\n")
    with pytest.raises(HRankError, match="'milestones'"):
        recipes.resolve(None, cfg)
    cfg.write_text("schedule: exponential\n")
    with pytest.raises(HRankError, match="'schedule' must be one of"):
        recipes.resolve(None, cfg)
    cfg.write_text("epochs: [\n")
    with pytest.raises(HRankError, match="cannot parse config"):
        recipes.resolve(None, cfg)


# --- fit: resume, checkpoints, NaN, selection ----------------------------------------------------------------

def test_resume_is_bit_identical(tmp_path: Path, cifar_sets):
    r = _recipe()
    full, res_full = _fit(cifar_sets, tmp_path / "full", r)
    part, res_part = _fit(cifar_sets, tmp_path / "part", r, stop_after_epoch=2)
    assert not res_part.completed and res_part.epochs_run == 2
    ckpt = train.read_checkpoint(tmp_path / "part" / "last.pt")
    assert ckpt["epoch"] == 2 and {"optimizer", "scheduler", "scaler", "rng", "best_metric", "recipe",
                                   "identity", "plan"} <= set(ckpt)
    assert {"python", "numpy", "torch", "cuda"} <= set(ckpt["rng"][0])
    torch.manual_seed(123)  # a different global RNG state: resume must restore the saved one
    resumed, res = _fit(cifar_sets, tmp_path / "part", r, seed=0, model=TinyNet(), resume=True)
    assert res.completed and res.best_epoch == res_full.best_epoch
    assert _same(full.state_dict(), resumed.state_dict())  # the selected (best) weights
    last_full = train.read_checkpoint(tmp_path / "full" / "last.pt")["model"]["state_dict"]
    last_resumed = train.read_checkpoint(tmp_path / "part" / "last.pt")["model"]["state_dict"]
    assert _same(last_full, last_resumed)
    rows = [json.loads(x) for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in rows] == [1, 2, 3, 4]
    assert rows == [json.loads(x) | {"images_per_s": rows[i]["images_per_s"], "epoch_s": rows[i]["epoch_s"]}
                    for i, x in enumerate((tmp_path / "full" / "metrics.jsonl").read_text().splitlines())]


def test_resume_refuses_another_run_and_changes_nothing(tmp_path: Path, cifar_sets):
    r = _recipe(epochs=2)
    _fit(cifar_sets, tmp_path / "run", r, stop_after_epoch=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(HRankError, match=r"cannot resume .*recipe lr \(0\.05 vs 0\.1\)"):
        _fit(cifar_sets, tmp_path / "run", _recipe(epochs=2, lr=0.1), resume=True)
    with pytest.raises(HRankError, match="cannot resume .*model"):
        _fit(cifar_sets, tmp_path / "run", r, model=TinyNet(width=4), resume=True)
    with pytest.raises(HRankError, match="already holds a run"):
        _fit(cifar_sets, tmp_path / "run", r)
    after = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert before == after


def test_interrupted_checkpoint_write_keeps_the_previous_one(tmp_path: Path, cifar_sets, monkeypatch):
    r = _recipe(epochs=3)
    _fit(cifar_sets, tmp_path / "run", r, stop_after_epoch=1)
    good = (tmp_path / "run" / "last.pt").read_bytes()
    real_save = torch.save

    def dying_save(obj, f, *a, **k):  # write half a file, then die like a killed process
        if isinstance(obj, dict) and obj.get("kind") == "last":
            real_save(obj, f, *a, **k)
            with open(f, "r+b") as fh:
                fh.truncate(100)
            raise KeyboardInterrupt
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _fit(cifar_sets, tmp_path / "run", r, resume=True)
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "run" / "last.pt").read_bytes() == good
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]
    assert train.read_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1
    _, res = _fit(cifar_sets, tmp_path / "run", r, resume=True)
    assert res.completed


class NaNAt(TinyNet):
    """Produces NaN logits at its n-th training forward pass."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x):
        out = super().forward(x)
        if self.training:
            self.calls += 1
            if self.calls == self.at:
                out = out * float("nan")
        return out


def test_nan_loss_stops_with_epoch_and_step(tmp_path: Path, cifar_sets):
    r = _recipe(epochs=3)  # 48 train images / 16 = 3 steps per epoch: call 5 is epoch 2, step 2
    with pytest.raises(train.NonFiniteLossError, match=r"loss became nan at epoch 2, step 2 of 3.*epoch 1"):
        _fit(cifar_sets, tmp_path / "run", r, model=NaNAt(5))
    ckpt = train.read_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"]["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "run" / "summary.json").exists()


def test_selection_never_silently_on_test(tmp_path: Path, cifar_sets):
    tr, va, te = cifar_sets
    r = _recipe(epochs=2)
    tb = train.make_train_batches(tr, r, normalization="cifar", device=CPU)
    teb = train.make_eval_batches(te, normalization="cifar", device=CPU)
    with pytest.raises(HRankError, match="no validation split.*--select-on-test"):
        train.fit(TinyNet(), tb, None, r, out_dir=tmp_path / "a", test_batches=teb, progress=False)
    lines: list[str] = []
    res = train.fit(TinyNet(), tb, None, r, out_dir=tmp_path / "b", test_batches=teb, select_on_test=True,
                    progress=False, printer=lines.append)
    assert res.selected_on == "test"
    assert any("WARNING" in ln and "TEST set" in ln for ln in lines)
    assert "SELECTED ON THE TEST SET" in lines[-1]
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["selected_on"] == "test"
    _, res = _fit(cifar_sets, tmp_path / "c", r)
    assert res.selected_on == "val" and res.val is not None and res.test is not None


# --- evaluate ------------------------------------------------------------------------------------------------

class LookupModel(nn.Module):
    """Returns a fixed logit row per image; the image's index is written in its first pixel."""

    def __init__(self, table: torch.Tensor, norm: Normalization) -> None:
        super().__init__()
        self.register_buffer("table", table)
        self.mean, self.std = norm.mean[0], norm.std[0]
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        idx = torch.round((x[:, 0, 0, 0] * self.std + self.mean) * 255).long()
        return self.table[idx]


def test_evaluate_numbers_on_known_outputs():
    norm = Normalization.get("cifar")
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    images = torch.zeros(6, 3, 32, 32, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(6, dtype=torch.uint8)
    logits = torch.full((6, 6), -10.0)
    logits[0, 0] = 5.0  # right
    logits[1, 3], logits[1, 0] = 5.0, 4.0  # wrong; the label is second: a top-5 hit
    logits[2, 1] = 5.0  # right
    logits[3, 2], logits[3, 1] = 5.0, -20.0  # wrong; the label is the lowest of 6: not in the top 5
    logits[4, 2] = 5.0  # right
    logits[5, 4], logits[5, 2] = 5.0, 0.0  # wrong; the label is second: a top-5 hit
    data = ImageSet(images, labels, [f"c{i}" for i in range(6)])
    m = train.evaluate(LookupModel(logits, norm), train.make_eval_batches(data, normalization=norm, device=CPU,
                                                                           batch_size=4))
    assert m["count"] == 6
    assert m["top1"] == pytest.approx(100 * 3 / 6)
    assert m["top5"] == pytest.approx(100 * 5 / 6)
    expected_loss = nn.functional.cross_entropy(logits, labels).item()
    assert m["loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert m["per_class"][:3] == [pytest.approx(50.0)] * 3 and m["per_class"][3:] == [None] * 3


# --- CLI -------------------------------------------------------------------------------------------------------

def _cli_common(tiny_cifar: Path) -> list[str]:
    return ["--data-dir", str(tiny_cifar), "--no-download", "--device", "cpu", "--no-progress"]


@pytest.mark.filterwarnings("ignore:cifar10-")
def test_cli_train_eval_and_bad_input(tmp_path: Path, tiny_cifar: Path, capsys):
    out = tmp_path / "run"
    args = ["train", "--model", "resnet_20", "--out", str(out), "--epochs", "2", "--batch-size", "16",
            "--val-size", "16", *_cli_common(tiny_cifar)]
    assert main(args + ["--stop-after", "1"]) == 0
    assert main(args + ["--resume"]) == 0
    text = capsys.readouterr().out
    assert "resuming at epoch 2/2" in text and "best validation top-1" in text and "test top-1" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["completed"] and summary["selected_on"] == "val"
    assert (out / "model.pt").is_file() and (out / "best.pt").is_file()

    ev = ["eval", "--model-file", str(out / "model.pt"), "--data-dir", str(tiny_cifar), "--no-download",
          "--device", "cpu", "--json", str(tmp_path / "m.json")]
    assert main(ev) == 0
    text = capsys.readouterr().out
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["count"] == 32 and f"top-1 {m['top1']:.2f}%" in text and "class9" in text
    assert m["top1"] == pytest.approx(summary["test"]["top1"])
    batch_file = tiny_cifar / "cifar-10-batches-py" / "data_batch_1"
    assert main(ev[:-2] + ["--split", str(batch_file)]) == 0
    assert f"data_batch_1: {len(load_batch_files([batch_file], 10))} images" in capsys.readouterr().out

    def one_line_error(argv, pattern):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and pattern in err, err

    one_line_error(args, "already exists")  # nothing overwritten
    one_line_error(args + ["--resume", "--lr", "0.5"], "cannot resume")
    one_line_error(["train", "--model", "resnet_20", "--out", str(tmp_path / "b"), "--batch-size", "64",
                    *_cli_common(tiny_cifar)], "batch size 64 is larger than the training set")
    one_line_error(["eval", "--model", "resnet_20", "--checkpoint", str(tmp_path / "nope.pt"),
                    *_cli_common(tiny_cifar)[:-1]], "checkpoint not found")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    one_line_error(["eval", "--model-file", str(tmp_path / "junk.pt"), *_cli_common(tiny_cifar)[:-1]],
                   "cannot read model file")
    one_line_error(["eval", "--model", "resnet_32", "--checkpoint", str(out / "best.pt"),
                    *_cli_common(tiny_cifar)[:-1]], "does not fit resnet_32")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("epochz: 3\n")
    one_line_error(["train", "--model", "resnet_20", "--out", str(tmp_path / "c"), "--config", str(cfg),
                    *_cli_common(tiny_cifar)], "unknown config key 'epochz'")
    assert summary == json.loads((out / "summary.json").read_text())


@pytest.mark.filterwarnings("ignore:cifar10-")
def test_cli_finetune_from_registry_checkpoint(tmp_path: Path, tiny_cifar: Path, capsys):
    torch.manual_seed(0)
    from hrank import models

    base = models.create("resnet_20")
    ckpt = tmp_path / "base.th"
    torch.save({"state_dict": {"module." + k: v for k, v in base.state_dict().items()}}, ckpt)
    out = tmp_path / "ft"
    code = main(["finetune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--out", str(out),
                 "--epochs", "1", "--batch-size", "16", "--val-size", "16", "--normalization", "imagenet",
                 *_cli_common(tiny_cifar)])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["run"]["normalization"] == "imagenet"
    model, info = train.load_model_file(out / "model.pt")
    assert info["normalization"]["name"] == "imagenet" and info["arch"] == "resnet_20"
    assert main(["finetune", "--model", "resnet_20", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x"),
                 "--recipe", "hrank", *_cli_common(tiny_cifar)]) == 2
    assert "needs the unpruned model and --plan" in capsys.readouterr().err


def test_recipe_flag_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["finetune", "--model-file", "x.pt", "--out", "o", "--schedule", "exp"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


# --- pruned models: one-shot fine-tune of a saved pruned model, layer-wise steps -----------------------------

prune = pytest.importorskip("hrank.prune")  # the layer-wise and pruned-model tests need hrank.prune


def _resnet20_plan(spec=None):
    from hrank import models
    from hrank.criteria import l1_scores
    from hrank.plan import make_plan

    torch.manual_seed(0)
    base = models.create("resnet_20")
    spec = spec or {"layer1.0.conv1": 0.5, "layer2.1.conv1": 0.5, "layer3.*.conv2": 0.25}
    return base, make_plan(base, l1_scores(base), spec)


def test_layerwise_steps_follow_groups_and_blocks():
    from hrank.layerwise import layerwise_steps

    base, plan = _resnet20_plan()
    steps = layerwise_steps(plan, base, "conv")
    assert [[g.members[0] for g in s] for s in steps] == [["layer1.0.conv1"], ["layer2.1.conv1"], ["layer3.0.conv2"]]
    assert set(steps[2][0].members) == {"layer3.0.conv2", "layer3.1.conv2", "layer3.2.conv2"}  # one stream
    base, plan = _resnet20_plan({"layer1.0.conv1": 0.5, "layer1.1.conv1": 0.5, "layer1.1.conv2": 0.0})
    assert [[g.members[0] for g in s] for s in layerwise_steps(plan, base, "block")] == \
        [["layer1.0.conv1"], ["layer1.1.conv1"]]  # a group the plan leaves whole is no step


def test_layerwise_transfer_keeps_finetuned_weights(tmp_path: Path):
    from hrank.layerwise import _model_for_step, _partial_plan, layerwise_steps

    base, plan = _resnet20_plan({"layer1.0.conv1": 0.5, "layer2.1.conv1": 0.5})
    steps = layerwise_steps(plan, base)
    p0, p1 = _partial_plan(plan, steps, 0), _partial_plan(plan, steps, 1)
    m0 = _model_for_step(base, p0, "physical", None, None)
    with torch.no_grad():  # "fine-tuned" weights, different from the template's
        for p in m0.parameters():
            p.add_(torch.randn_like(p))
    m1 = _model_for_step(base, p1, "physical", m0.state_dict(), p0)
    kept = torch.tensor(plan.layers["layer2.1.conv1"])
    s0, s1 = m0.state_dict(), m1.state_dict()
    assert s1["layer2.1.conv1.weight"].shape[0] == len(kept) == 16
    for key, v in s1.items():
        if key.startswith("layer2.1.conv1") or key.startswith("layer2.1.bn1."):
            ref = s0[key][kept] if s0[key].dim() else s0[key]
        elif key == "layer2.1.conv2.weight":
            ref = s0[key][:, kept]
        else:
            ref = s0[key]
        assert torch.equal(v, ref), key


def test_layerwise_resumes_at_step_granularity_and_modes_agree(tmp_path: Path, cifar_sets):
    from hrank.criteria import l1_scores
    from hrank.layerwise import fit_layerwise
    from hrank.models.resnet_cifar import ResNetCifar
    from hrank.plan import make_plan

    tr, va, te = cifar_sets
    torch.manual_seed(0)
    base = ResNetCifar(8)  # one block per stage, outside the registry: the driver needs no registry entry
    plan = make_plan(base, l1_scores(base), {"layer1.0.conv1": 0.5, "layer2.0.conv1": 0.5},
                     example_input=torch.zeros(1, 3, 32, 32))
    r = recipes.resolve("hrank", overrides={"epochs": 2, "batch_size": 16, "milestones": [1], "lr": 1e-4})
    tb = train.make_train_batches(tr, r, normalization="cifar", device=CPU)
    vb = train.make_eval_batches(va, normalization="cifar", device=CPU)
    teb = train.make_eval_batches(te, normalization="cifar", device=CPU)
    quiet = {"progress": False, "printer": lambda s: None}
    results = {}
    for mode in ("physical", "mask"):
        full, res = fit_layerwise(base, plan, tb, vb, r, mode=mode, out_dir=tmp_path / mode, test_batches=teb,
                                  **quiet)
        assert res.completed and res.test is not None and (tmp_path / mode / "model.pt").is_file()
        results[mode] = full
    # interrupted inside step 1 (after epoch 1 of 2), resumed and interrupted after step 1, resumed to the end
    _, res = fit_layerwise(base, plan, tb, vb, r, mode="physical", out_dir=tmp_path / "cut", stop_after_epoch=1,
                           **quiet)
    assert not res.completed
    _, res = fit_layerwise(base, plan, tb, vb, r, mode="physical", out_dir=tmp_path / "cut", resume=True,
                           stop_after_epoch=2, **quiet)
    assert not res.completed
    assert json.loads((tmp_path / "cut" / "layerwise.json").read_text())["done"] == 1
    resumed, res = fit_layerwise(base, plan, tb, vb, r, mode="physical", out_dir=tmp_path / "cut", resume=True,
                                 test_batches=teb, **quiet)
    assert res.completed
    assert _same(resumed.state_dict(), results["physical"].state_dict())
    with pytest.raises(HRankError, match="cannot resume"):
        fit_layerwise(base, plan, tb, vb, r, mode="mask", out_dir=tmp_path / "cut", resume=True, **quiet)
    # mask and physical mode fine-tune the same function up to float order: masks zero an uncoupled conv's
    # filters and their BN, which physical removal reproduces (the lr is small because this random model
    # on random data amplifies float-order differences)
    loaded, info = train.load_model_file(tmp_path / "physical" / "model.pt", builder=lambda: ResNetCifar(8))
    assert info["mode"] == "physical" and loaded.layer2[0].conv1.out_channels == 16
    x = next(iter(vb))[0]
    results["mask"].eval(), results["physical"].eval(), loaded.eval()
    assert torch.allclose(results["mask"](x), results["physical"](x), atol=1e-4)
    assert torch.equal(loaded(x), results["physical"](x))


class _DropoutNet(nn.Module):
    """Draws from the global RNG while training (dropout), as many user models do."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.drop(self.b(self.a(x)).mean((2, 3))))


def test_layerwise_resumed_at_a_step_boundary_draws_what_the_uninterrupted_run_drew(tmp_path: Path, cifar_sets):
    from hrank.criteria import l1_scores
    from hrank.layerwise import fit_layerwise
    from hrank.plan import make_plan

    tr, va, _ = cifar_sets
    torch.manual_seed(0)
    base = _DropoutNet()
    plan = make_plan(base, l1_scores(base), {"a.0": 0.5, "b.0": 0.5}, example_input=torch.zeros(1, 3, 32, 32))
    r = recipes.resolve("hrank", overrides={"epochs": 1, "batch_size": 16, "milestones": [], "lr": 0.05})
    tb = train.make_train_batches(tr, r, normalization="cifar", device=CPU)
    vb = train.make_eval_batches(va, normalization="cifar", device=CPU)
    quiet = {"progress": False, "printer": lambda s: None, "tensorboard": False}
    torch.manual_seed(7)  # what the pipeline does before every call
    full, res = fit_layerwise(base, plan, tb, vb, r, mode="physical", out_dir=tmp_path / "full", **quiet)
    assert res.completed
    torch.manual_seed(7)
    _, res = fit_layerwise(base, plan, tb, vb, r, mode="physical", out_dir=tmp_path / "cut", stop_after_epoch=1,
                           **quiet)
    assert not res.completed and json.loads((tmp_path / "cut" / "layerwise.json").read_text())["done"] == 1
    torch.manual_seed(7)
    resumed, res = fit_layerwise(base, plan, tb, vb, r, mode="physical", out_dir=tmp_path / "cut", resume=True,
                                 **quiet)
    assert res.completed
    assert _same(resumed.state_dict(), full.state_dict())


@pytest.mark.filterwarnings("ignore:cifar10-")
def test_cli_finetune_pruned_model_file(tmp_path: Path, tiny_cifar: Path, capsys):
    base, plan = _resnet20_plan({"layer1.0.conv1": 0.5, "layer3.*.conv2": 0.25})
    from hrank.checkpoint import save

    pruned = prune.apply_plan(base, plan, mode="physical")
    save(pruned, tmp_path / "pruned.pt", normalization="imagenet")
    out = tmp_path / "ft"
    assert main(["finetune", "--model-file", str(tmp_path / "pruned.pt"), "--out", str(out), "--epochs", "1",
                 "--batch-size", "16", "--val-size", "16", *_cli_common(tiny_cifar)]) == 0
    model, info = train.load_model_file(out / "model.pt")
    assert info["mode"] == "physical" and info["plan"] is not None and info["normalization"]["name"] == "imagenet"
    assert model.layer1[0].conv1.out_channels == 8
    plan_file = tmp_path / "plan.json"
    plan.save(plan_file)
    torch.save(_resnet20_plan()[0].state_dict(), tmp_path / "base.pt")
    common = ["--model", "resnet_20", "--checkpoint", str(tmp_path / "base.pt"), "--plan", str(plan_file),
              "--epochs", "1", "--batch-size", "16", "--val-size", "16", *_cli_common(tiny_cifar)]
    assert main(["finetune", "--out", str(tmp_path / "lw"), "--recipe", "hrank", "--mode", "mask", *common]) == 0
    assert "layer-wise fine-tuning done: 2 steps" in capsys.readouterr().out
    _, info = train.load_model_file(tmp_path / "lw" / "model.pt")
    assert info["mode"] == "mask"
    assert main(["finetune", "--out", str(tmp_path / "os"), "--mode", "physical", *common]) == 0
    other = tmp_path / "other.json"
    _resnet20_plan({"layer1.0.conv1": 0.25})[1].save(other)
    assert main(["finetune", "--out", str(tmp_path / "os"), "--mode", "physical", "--resume",
                 *[str(other) if a == str(plan_file) else a for a in common]]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "plan" in err and err.count("\n") == 1
    assert main(["finetune", "--model-file", str(out / "model.pt"), "--plan", str(plan_file), "--out",
                 str(tmp_path / "x"), *_cli_common(tiny_cifar)]) == 2
    assert "already pruned" in capsys.readouterr().err
