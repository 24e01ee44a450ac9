"""The main job (``slotpack demo``) on a subset of real MNIST."""

import pytest
from click.testing import CliRunner

from slotpack.cli import main
from slotpack.pipeline import demo


@pytest.mark.slow
def test_demo_trains_both_and_reports(mnist_root, tmp_path):
    rows = demo(tmp_path / "demo", root=mnist_root, epochs=1, limit=5000, device="cpu")
    assert [r.method for r in rows] == ["slot", "learned"]
    slot, learned = rows
    assert slot.bits_per_connection == 3 and learned.bits_per_connection == 32
    assert slot.connections == learned.connections == 266_200
    assert slot.test_acc > 0.8 and learned.test_acc > 0.7
    r = CliRunner().invoke(
        main, ["demo", "--out", str(tmp_path / "demo"), "--root", str(mnist_root)]
    )
    assert r.exit_code == 2 and "already exists" in r.output  # earlier runs are never overwritten


def test_demo_cli_prints_the_table(mnist_root, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "demo",
            "--out",
            str(tmp_path / "d"),
            "--epochs",
            "1",
            "--limit",
            "1500",
            "--root",
            str(mnist_root),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "lenet300100 K=8" in r.output and "lenet300100 float32" in r.output
    assert "10.7x" in r.output
