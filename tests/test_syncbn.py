"""hrank.syncbn without a process group: plain BatchNorm in every respect (the 2-process equality with one
process is tests/test_train_ddp.py::test_sync_bn_two_gloo_processes_match_one)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hrank import recipes
from hrank.errors import HRankError
from hrank.syncbn import SyncBatchNorm2d, convert_sync_bn, has_batchnorm, is_synced, revert_sync_bn, use_sync_bn


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 6),
                         nn.BatchNorm1d(6, momentum=None), nn.Linear(6, 3))


@pytest.mark.parametrize("training", [True, False])
def test_synced_bn_equals_batchnorm_without_a_process_group(training: bool):
    plain = _net()
    synced = convert_sync_bn(copy.deepcopy(plain), torch.device("cpu"))
    assert isinstance(synced[1], SyncBatchNorm2d) and isinstance(synced[1], nn.BatchNorm2d) and is_synced(synced[5])
    x = torch.randn(5, 3, 8, 8) * 2 + 1
    for m in (plain, synced):
        m.train(training)
    for _ in range(3):  # running statistics accumulate identically (momentum 0.1 and cumulative)
        outs = [m(x) for m in (plain, synced)]
        for m, out in zip((plain, synced), outs, strict=True):
            m.zero_grad()
            out.square().mean().backward()
        torch.testing.assert_close(outs[1], outs[0])
    for (name, a), b in zip(plain.named_parameters(), synced.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), synced.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, msg=name)


def test_convert_keeps_the_state_dict_masks_and_flags():
    model = _net()
    model[1].register_buffer("hrank_mask__weight", torch.tensor([1.0, 0.0, 1.0, 1.0]), persistent=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    versions = dict(model.state_dict()._metadata)
    convert_sync_bn(model, torch.device("cpu"))
    after = model.state_dict()
    assert list(after) == list(before) and dict(after._metadata) == versions
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert torch.equal(model[1].hrank_mask__weight, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert model[5].momentum is None and model[5].track_running_stats and model[5].affine
    plain = _net()
    plain.load_state_dict(after)  # checkpoints of a synced model load into an unsynced one
    revert_sync_bn(model)
    assert type(model[1]) is nn.BatchNorm2d and type(model[5]) is nn.BatchNorm1d


def test_saved_synced_model_loads_as_plain_batchnorm(tmp_path):
    from hrank import load, models, save

    model = models.create("resnet_20")
    convert_sync_bn(model, torch.device("cpu"))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    path = save(model, tmp_path / "m.pt")
    loaded, _ = load(path)
    assert not any(is_synced(m) for m in loaded.modules())
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_auto_rule_and_recipe_values():
    bn, plain = _net(), nn.Sequential(nn.Linear(2, 2))
    assert has_batchnorm(bn) and not has_batchnorm(plain)
    assert not use_sync_bn("on", bn, 8, 1)  # one process: nothing to synchronise
    assert not use_sync_bn("on", plain, 8, 2)
    assert use_sync_bn("on", bn, 1024, 2) and not use_sync_bn("off", bn, 8, 2)
    assert use_sync_bn("auto", bn, 8, 2)
    assert recipes.resolve("fast").sync_bn == "auto"
    assert recipes.resolve("fast", overrides={"sync_bn": True}).sync_bn == "on"  # old boolean configs
    assert recipes.from_json({**recipes.resolve("fast").to_json(), "sync_bn": False}).sync_bn == "off"
    with pytest.raises(HRankError, match="sync_bn"):
        recipes.resolve("fast", overrides={"sync_bn": "maybe"})
