"""Saved models keep their state_dict metadata (module versions): modules that check the version they were saved
with in ``_load_from_state_dict`` (as torchvision's MNASNet does) load, pruned or not, bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import hrank
from hrank.checkpoint import build_from_record, load_state, model_record, read_record, state_metadata
from hrank.errors import HRankError
from hrank.io import atomic_torch_save
from hrank.plan import make_plan
from hrank.prune import apply_plan

X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))


class VersionedBlock(nn.Module):
    """conv-BN-ReLU-conv-BN with a residual; like MNASNet's ``_InvertedResidual`` it insists on knowing the
    version of the state it loads and remembers it (a version-1 state would need converting)."""

    _version = 3

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width * 2, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width * 2)
        self.conv2 = nn.Conv2d(width * 2, width, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.loaded_version: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version not in (1, 2, 3):
            raise ValueError(f"version should be 1, 2 or 3 instead of {version}")
        self.loaded_version = version
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class VersionedNet(nn.Module):
    """A small CNN whose root module checks its version too (MNASNet's own ``_load_from_state_dict``)."""

    _version = 2

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.block = VersionedBlock(8)
        self.head = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, num_classes)
        self.loaded_version: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.head(self.block(self.stem(x)))).mean((2, 3)))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version not in (1, 2):
            raise ValueError(f"version should be set to 1 or 2 instead of {version}")
        self.loaded_version = version
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _trained_like(model: nn.Module) -> nn.Module:
    """Random weights with non-trivial BN statistics, in eval mode."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def _pruned(mode: str) -> VersionedNet:
    torch.manual_seed(0)
    model = _trained_like(VersionedNet())
    rng = np.random.default_rng(0)
    scores = {n: rng.random(m.out_channels) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    plan = make_plan(model, scores, {"block.conv1": 0.5, "head": 0.25}, example_input=X[:1])
    return apply_plan(model, plan, mode=mode, example_input=X[:1]).eval()


def test_plain_state_dict_without_metadata_fails_for_versioned_modules():
    """The problem: a plain dict of tensors has no ``_metadata``, so the version check sees None."""
    model = VersionedNet()
    with pytest.raises(ValueError, match="instead of None"):
        VersionedNet().load_state_dict(dict(model.state_dict()))


def test_record_holds_json_module_versions():
    model = VersionedNet()
    meta = state_metadata(model)
    assert meta[""]["version"] == 2 and meta["block"]["version"] == 3 and meta["stem.1"]["version"] == 2
    assert state_metadata(model.state_dict()) == meta and state_metadata({"w": torch.zeros(1)}) == {}
    record = model_record(model)
    assert record["state_metadata"] == meta and json.loads(json.dumps(record)) == record


def test_save_load_restores_versions_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = _trained_like(VersionedNet())
    model.block._version = 1  # saved by an older release of the block: the loader must see 1, not today's 3
    path = hrank.save(model, tmp_path / "m.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) == {"format", "hrank_record", "state_dict"}
    assert json.loads(raw["hrank_record"])["state_metadata"]["block"] == {"version": 1}
    loaded, _ = hrank.load(path, builder=VersionedNet)
    assert (loaded.loaded_version, loaded.block.loaded_version) == (2, 1)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


@pytest.mark.parametrize("mode", ["physical", "mask"])
def test_pruned_round_trip_bit_exact(tmp_path, mode):
    model = _pruned(mode)
    assert model.hrank_plan is not None
    path = hrank.save(model, tmp_path / "p.pt")
    loaded, meta = hrank.load(path, builder=VersionedNet)
    assert meta["mode"] == mode and loaded.block.loaded_version == 3 and loaded.loaded_version == 2
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_training_checkpoint_record_with_weights(tmp_path):
    """model_record(weights=True) (what training checkpoints embed), through torch.save/torch.load and JSON."""
    model = _pruned("physical")
    record = model_record(model, weights=True)
    path = atomic_torch_save({"model": record}, tmp_path / "ckpt.pt")
    back = torch.load(path, weights_only=True)["model"]
    again = build_from_record(back, VersionedNet).eval()
    assert again.block.loaded_version == 3
    with torch.no_grad():
        assert torch.equal(again(X), model(X))
    # the metadata part survives a JSON round trip on its own (as in hrank.save's file)
    meta_only = json.loads(json.dumps({k: v for k, v in record.items() if k != "state_dict"}))
    again = build_from_record({**meta_only, "state_dict": record["state_dict"]}, VersionedNet).eval()
    with torch.no_grad():
        assert torch.equal(again(X), model(X))


def test_load_state_uses_the_state_dicts_own_metadata(tmp_path):
    """A state_dict written by torch.save keeps ``_metadata``; load_state passes it on."""
    model = _trained_like(VersionedNet())
    path = atomic_torch_save({"state_dict": model.state_dict()}, tmp_path / "sd.pt")
    fresh = VersionedNet()
    load_state(fresh, torch.load(path, weights_only=True)["state_dict"])
    assert fresh.block.loaded_version == 3
    with torch.no_grad():
        assert torch.equal(fresh.eval()(X), model(X))


def test_files_without_metadata_still_load(tmp_path):
    """Files from before state_metadata existed: modules without version checks load as before."""
    def build() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 2))

    torch.manual_seed(0)
    model = _trained_like(build())
    path = hrank.save(model, tmp_path / "old.pt")
    raw = torch.load(path, weights_only=True)
    record = json.loads(raw["hrank_record"])
    del record["state_metadata"]
    raw["hrank_record"] = json.dumps(record)
    raw["state_dict"] = dict(raw["state_dict"])
    atomic_torch_save(raw, path)
    assert "state_metadata" not in read_record(path)[0]
    loaded, _ = hrank.load(path, builder=build)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


def test_mismatched_weights_are_still_a_one_line_error(tmp_path):
    path = hrank.save(_trained_like(VersionedNet()), tmp_path / "m.pt")
    with pytest.raises(HRankError, match="checkpoint does not fit") as e:
        hrank.load(path, builder=lambda: VersionedNet(num_classes=7))
    assert "\n" not in str(e.value)
