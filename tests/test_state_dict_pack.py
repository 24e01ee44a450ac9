"""`slotpack pack checkpoint.pt` of a bare state_dict (issue 12): slot layers record themselves in
their state_dict (layers.SlotRecord), so `torch.save(slot.state_dict(), path)` packs without the
model, to the bytes `slotpack.save` writes; records are checked on load, and state_dicts saved
before layers recorded themselves still load."""

from pathlib import Path

import pytest
import torch
import torchvision
from click.testing import CliRunner
from torch import nn

import slotpack
from slotpack import format as F
from slotpack import models
from slotpack.checkpoint import (
    TrainConfig,
    load_checkpoint,
    pack_checkpoint,
    pack_net,
    run_metadata,
)
from slotpack.cli import main
from slotpack.errors import CheckpointError, ConfigError
from slotpack.layers import EXTRA_STATE, SlotLinear
from slotpack.modelfile import pack_state_dict
from tests.helpers import one_line_error, trained_like


class ConvNet(nn.Module):
    """A small CIFAR-shaped conv net: conv-BN, a strided grouped conv, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, groups=2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).flatten(1))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def perturbed(slot: nn.Module, seed: int = 0, share: float = 0.1) -> nn.Module:
    """``slot`` with some connections moved off their initial choice, as training leaves them,
    and BatchNorm statistics that are not the defaults; in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in slotpack.slot_layers(slot):
            bump = torch.rand(layer.scores.shape, generator=g) < share
            layer.scores.add_(bump * layer.bound * 2)
        slot.train()
        slot(torch.randn(4, 3, 16, 16, generator=g))
    return slot.eval()


def records(state: dict) -> dict:
    return {k: v for k, v in state.items() if not torch.is_tensor(v)}


def without_records(state: dict) -> dict:
    """A state_dict as slotpack wrote it before slot layers recorded themselves."""
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def check_shell_route(slot: nn.Module, dense: nn.Module, x: torch.Tensor, tmp: Path) -> None:
    """torch.save(state_dict) -> `slotpack pack` -> the bytes of slotpack.save -> the dense
    model loaded from the file computes the slot model's eval logits exactly."""
    torch.save(slot.state_dict(), tmp / "checkpoint.pt")
    r = cli("pack", tmp / "checkpoint.pt", "-o", tmp / "m.slot")
    assert r.exit_code == 0, r.output
    slotpack.save(slot, tmp / "saved.slot")
    assert (tmp / "m.slot").read_bytes() == (tmp / "saved.slot").read_bytes()
    dense.load_state_dict(slotpack.load_state_dict(tmp / "m.slot"), strict=True)
    slot.eval(), dense.eval()
    with torch.no_grad():
        assert torch.equal(dense(x), slot(x))


@pytest.mark.parametrize(
    "k,selection,seed",
    [
        (8, "greedy", 0),
        ((2, 8, 16), "greedy", 2**64 - 1),  # per-layer K; the largest seed round-trips
        (4, "probabilistic", 7),  # the deployed index is the fixed seeded draw
    ],
)
def test_a_saved_state_dict_packs_to_the_bytes_of_save(k, selection, seed, tmp_path):
    torch.manual_seed(0)
    slot = perturbed(slotpack.slotify(ConvNet(), k=k, seed=seed, selection=selection))
    ks = (k,) * 3 if isinstance(k, int) else k
    want = [
        {"slotpack": 1, "seed": seed, "layer": i, "k": ks[i], "selection": selection,
         "init": "onedraw16", "shape": shape}
        for i, shape in enumerate([[8, 3, 3, 3], [16, 4, 3, 3], [10, 16]])
    ]  # fmt: skip
    loaded = torch.load(_saved(slot, tmp_path), weights_only=True)
    assert list(records(loaded).values()) == want
    assert list(records(loaded)) == ["features.0._extra_state", "features.3._extra_state",
                                     "fc._extra_state"]  # fmt: skip
    torch.manual_seed(1)
    check_shell_route(slot, ConvNet(), torch.randn(3, 3, 16, 16), tmp_path)
    f = F.read(tmp_path / "m.slot")
    assert f.ks == ks and f.seed == seed and f.manifest["selection"] == selection


def _saved(model: nn.Module, folder: Path) -> Path:
    torch.save(model.state_dict(), folder / "state.pt")
    return folder / "state.pt"


@pytest.mark.slow
def test_resnet18_state_dict_packs_to_the_bytes_of_save(tmp_path):
    torch.manual_seed(0)
    slot = slotpack.slotify(torchvision.models.resnet18(num_classes=10), k=8, seed=0)
    with torch.no_grad():  # a few changed selections, as training leaves them
        slot.fc.scores[:, 0] += slot.fc.bound
        slot.layer4[1].conv2.scores[::7, 3] += slot.layer4[1].conv2.bound
    check_shell_route(slot, torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32), tmp_path)  # fmt: skip
    assert cli("inspect", tmp_path / "m.slot").exit_code == 0


def test_inspect_and_unpack_read_the_result(tmp_path):
    slot = perturbed(slotpack.slotify(ConvNet(), k=4, seed=3))
    r = cli("pack", _saved(slot, tmp_path), "-o", tmp_path / "m.slot")
    assert r.exit_code == 0 and "bits per connection" in r.output
    r = cli("inspect", tmp_path / "m.slot")
    assert r.exit_code == 0 and "features.3.weight" in r.output and "fc.weight" in r.output
    r = cli("eval", tmp_path / "state.pt")  # a run's command: the error says what packs it
    one_line_error(r, "is the state_dict of a slotified model", "`slotpack pack")
    assert EXTRA_STATE not in r.output
    r = cli("unpack", tmp_path / "m.slot", "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 0, r.output
    from safetensors.torch import load_file

    unpacked = load_file(tmp_path / "m.safetensors")
    dense = slotpack.dense_state_dict(slot)
    assert unpacked.keys() == dense.keys()
    assert all(torch.equal(unpacked[n], v) for n, v in dense.items())


def test_dense_state_dict_holds_no_records():
    slot = perturbed(slotpack.slotify(ConvNet(), k=4, seed=3))
    state = slotpack.dense_state_dict(slot)
    assert all(torch.is_tensor(v) for v in state.values())
    ConvNet().load_state_dict(state, strict=True)


def test_a_state_dict_saved_without_records_still_loads_strictly(tmp_path):
    slot = perturbed(slotpack.slotify(ConvNet(), k=4, seed=3))
    torch.save(without_records(slot.state_dict()), tmp_path / "old.pt")
    fresh = slotpack.slotify(ConvNet(), k=4, seed=3)
    result = fresh.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True))
    assert not result.missing_keys and not result.unexpected_keys
    fresh.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh(x), slot(x))
    # ...and re-saved with this version it packs
    slotpack.save(slot, tmp_path / "want.slot")
    assert pack_state_dict(fresh.state_dict())[0] == (tmp_path / "want.slot").read_bytes()


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(seed=4), "seed 3 in the state_dict, 4 in this model"),
        (dict(k=8), "k 4 in the state_dict, 8 in this model"),  # the scores' shape differs too
        (dict(selection="probabilistic"), "selection 'greedy' in the state_dict"),
        (dict(init="uniform"), "init 'onedraw16' in the state_dict, 'uniform' in this model"),
    ],
)
def test_a_record_that_does_not_match_the_model_is_refused_on_load(change, field):
    state = slotpack.slotify(ConvNet(), k=4, seed=3).state_dict()
    other = slotpack.slotify(ConvNet(), **{"k": 4, "seed": 3, **change})
    with pytest.raises(CheckpointError, match="slot layer 'features.0' \\(layer 0\\): " + field):
        other.load_state_dict(state, strict=False)  # never silently, strict or not
    numbered = slotpack.slotify(ConvNet(), k=4, seed=3, exclude="features.0")
    with pytest.raises(CheckpointError, match="layer 1 in the state_dict, 0 in this model"):
        numbered.load_state_dict(state, strict=False)


def test_malformed_records_are_refused_on_load():
    layer = SlotLinear(3, 2, 4, seed=0, layer=0)
    good = layer.state_dict()
    for record, needle in [
        ({**good[EXTRA_STATE], "slotpack": 2}, "version 2"),
        ({**good[EXTRA_STATE], "seed": -1}, "seed -1"),
        ({**good[EXTRA_STATE], "extra": 1}, "unknown keys"),
        ([1, 2], "a list, not a dict"),
    ]:
        with pytest.raises(CheckpointError, match=f"'<root>'.*malformed slot layer record.*{needle}"):  # fmt: skip
            layer.load_state_dict({**good, EXTRA_STATE: record})


def test_pack_state_dict_errors():
    state = perturbed(slotpack.slotify(ConvNet(), k=4, seed=3)).state_dict()
    cases = [
        (ConvNet().state_dict(), ConfigError, "no slot layers"),
        (without_records(state), CheckpointError, "saved before slot layers recorded themselves"),
        ({**state, "fc.scores": torch.zeros(3, 4)}, CheckpointError, r"fc.scores: expected float scores of shape \[160, 4\]"),
        ({**state, "fc._extra_state": {"slotpack": 1}}, CheckpointError, r"fc._extra_state: malformed .* missing"),
        ({**state, "note": "hello"}, CheckpointError, "entry 'note' is not a tensor"),
        ({**state, "fc._extra_state": {**state["fc._extra_state"], "layer": 5}}, ConfigError, "numbered 0, 1, 2, ... in order .* got 0, 1, 5"),
        ({**state, "fc._extra_state": {**state["fc._extra_state"], "seed": 5}}, ConfigError, "one seed"),
        ([state], CheckpointError, "not a list"),
    ]  # fmt: skip
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            pack_state_dict(bad)
    shared = nn.Linear(4, 4)  # one slot layer under two names: a file names each weight once
    twice = slotpack.slotify(nn.Sequential(shared, nn.ReLU(), shared), k=2, seed=0)
    with pytest.raises(ConfigError, match="got 0, 0; a slot layer used in two places"):
        slotpack.pack_module(twice)


def test_bad_inputs_are_one_line_cli_errors_and_write_nothing(tmp_path):
    slot = perturbed(slotpack.slotify(ConvNet(), k=4, seed=3))
    good = _saved(slot, tmp_path).read_bytes()
    files = {
        "dense.pt": (ConvNet().state_dict(), "no slot layers"),
        "old.pt": (without_records(slot.state_dict()), "saved before slot layers recorded"),
        "nested.pt": ({"model": slot.state_dict(), "epoch": 3}, "entry 'model' is not a tensor"),
        "list.pt": ([torch.zeros(2)], "a state_dict is a dict of tensors, not a list"),
        "whole.pt": (slot, "it holds Python objects"),  # a pickle weights_only refuses
    }
    for name, (obj, _) in files.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "corrupt.pt").write_bytes(good[: len(good) // 2])
    files["corrupt.pt"] = (None, "truncated or damaged")
    for name, (_, needle) in files.items():
        r = cli("pack", tmp_path / name, "-o", tmp_path / "m.slot")
        one_line_error(r, str(tmp_path / name), needle)
        assert not (tmp_path / "m.slot").exists(), name
    assert [p.name for p in tmp_path.iterdir() if p.suffix != ".pt"] == []


# --------------------------------------------------------------- run checkpoints keep packing


def _run_checkpoint(cfg: TrainConfig, state: dict, path: Path) -> Path:
    ckpt = {"slotpack_checkpoint": 1, "config": cfg.to_dict(), "model": state, "epoch": 0}
    torch.save(ckpt, path)
    return path


def test_run_checkpoints_pack_alike_with_and_without_records(tmp_path):
    """`slotpack train` now saves records in best.pt; checkpoints written before do not have
    them: both pack to the bytes of the model itself (resnet20: weights-only; lenet: zoo)."""
    for name in ("resnet20", "lenet300100"):
        cfg = TrainConfig(model=name, k=4, seed=5).resolved()
        model = trained_like(models.create(name, 4, seed=5), 1)
        states = {"new": model.state_dict(), "old": without_records(model.state_dict())}
        paths = [_run_checkpoint(cfg, s, tmp_path / f"{name}-{k}.pt") for k, s in states.items()]
        want = pack_net(model, metadata=run_metadata(load_checkpoint(paths[1])))[0]
        assert [pack_checkpoint(path)[0] for path in paths] == [want, want]
        assert F.decode(want).weights_only == (name == "resnet20")


def test_a_run_checkpoint_whose_record_contradicts_its_config_is_one_line(tmp_path):
    cfg = TrainConfig(model="resnet20", k=4, seed=5).resolved()
    state = models.create("resnet20", 4, seed=5).state_dict()
    key = next(k for k in state if k.endswith(EXTRA_STATE))
    state[key] = {**state[key], "seed": 6}
    path = _run_checkpoint(cfg, state, tmp_path / "best.pt")
    r = cli("pack", path, "-o", tmp_path / "m.slot")
    one_line_error(r, "does not fit model resnet20", "seed 6 in the state_dict, 5 in this model")
    assert not (tmp_path / "m.slot").exists()
