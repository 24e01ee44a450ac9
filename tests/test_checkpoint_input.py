"""Bounded K and validated checkpoints (issue 15.15): a K no file can hold is refused before
anything is allocated, and checkpoints that torch loads safely but that do not hold what slotpack
wrote (wrong types, lists for dicts, unknown models, huge K) are one-line errors, not tracebacks."""

import pytest
import torch
from click.testing import CliRunner

from slotpack import models
from slotpack.cli import main
from slotpack.errors import CheckpointError, ConfigError
from slotpack.train import TrainConfig, load_checkpoint
from tests.helpers import one_line_error


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("k", [65_537, 70_000, 2**31, 2**64])
def test_k_beyond_what_a_file_holds_is_refused_before_allocating(k):
    with pytest.raises(ConfigError, match="K must be >= 2 and <= 65536"):
        TrainConfig(model="lenet300100", k=k)
    with pytest.raises(ConfigError, match="K must be >= 2 and <= 65536"):
        models.create("lenet300100", k)
    one_line_error(_cli("train", "--model", "conv2", "--k", k, "--out", "unused"), "K must be")


def test_config_fields_must_have_their_types():
    with pytest.raises(ConfigError, match="k must be int, got str '8'"):
        TrainConfig(model="lenet300100", k="8")
    with pytest.raises(ConfigError, match="lean must be bool"):
        TrainConfig(model="lenet300100", lean=1)
    with pytest.raises(ConfigError, match=r"milestones must be tuple\[int, \.\.\.\] \| None"):
        TrainConfig(model="lenet300100", milestones=5)
    cfg = TrainConfig(model="lenet300100", milestones=[3, 5], lr=1)  # JSON's lists, ints as floats
    assert cfg.milestones == (3, 5) and cfg == TrainConfig.from_dict(cfg.to_dict())


@pytest.fixture(scope="module")
def checkpoint():
    """What `slotpack train` writes to best.pt, for a K=2 Lenet (no training needed)."""
    cfg = TrainConfig(model="lenet300100", k=2).resolved()
    state = models.create("lenet300100", 2).state_dict()
    return {"slotpack_checkpoint": 1, "config": cfg.to_dict(), "model": state, "epoch": 0}


def _config(**change):
    return lambda c: {**c, "config": {**c["config"], **change}}


def _record(**change):
    """A checkpoint whose first slot layer's record (layers.SlotRecord) is changed."""
    return lambda c: {
        **c,
        "model": {**c["model"], "1._extra_state": {**c["model"]["1._extra_state"], **change}},
    }


HOSTILE = {  # each torch.load(weights_only=True)s fine: no pickle, only primitives and tensors
    "string K": (_config(k="8"), "k must be int"),
    "huge K": (_config(k=2**31), "K must be >= 2 and <= 65536"),
    "string epoch": (lambda c: {**c, "epoch": "3"}, "'epoch' must be an int"),
    "negative epoch": (lambda c: {**c, "epoch": -1}, "'epoch' must be an int"),
    "config a list": (lambda c: {**c, "config": list(c["config"].items())}, "config is a list"),
    "model a list": (lambda c: {**c, "model": list(c["model"].values())}, "'model' is a list"),
    "model of strings": (lambda c: {**c, "model": {"1.scores": "x"}}, "not a named tensor"),
    "record of strings": (_record(seed="0"), "malformed slot layer record: seed '0'"),
    "record of a version to come": (_record(slotpack=2), "version 2"),
    "numeric model name": (_config(model=5), "model must be str"),
    "unknown model name": (_config(model="alexnet"), "unknown model"),
    "model name missing": (lambda c: {**c, "config": {"k": 2}}, "config lacks ['model']"),
    "integer config key": (lambda c: {**c, "config": {**c["config"], 7: 1}}, "unknown keys"),
    "milestones a number": (_config(milestones=5), "milestones must be"),
    "string val_acc": (lambda c: {**c, "val_acc": "high"}, "'val_acc' must be a number"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_malformed_checkpoints_are_one_line_in_pack(name, checkpoint, tmp_path):
    change, needle = HOSTILE[name]
    path = tmp_path / "best.pt"
    torch.save(change(checkpoint), path)
    with pytest.raises(CheckpointError, match="is malformed"):
        load_checkpoint(path)
    r = _cli("pack", path, "-o", tmp_path / "m.slot")
    one_line_error(r, str(path), "is malformed", needle)
    assert not (tmp_path / "m.slot").exists()


def test_the_untouched_checkpoint_packs(checkpoint, tmp_path):
    torch.save(checkpoint, tmp_path / "best.pt")
    r = _cli("pack", tmp_path / "best.pt", "-o", tmp_path / "m.slot")
    assert r.exit_code == 0, r.output
