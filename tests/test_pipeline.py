"""The main job (``slotpack demo``): train, pack, export, onnxruntime, on a subset of real MNIST."""

from pathlib import Path

from click.testing import CliRunner

from slotpack import format as F
from slotpack.cli import main
from slotpack.pack import repack
from slotpack.pipeline import demo


def test_demo_runs_the_whole_path(mnist_root, tmp_path):
    out = tmp_path / "demo"
    (out).mkdir()
    (out / "notes.txt").write_text("mine")  # something of the user's in --out
    rows = demo(out, root=mnist_root, epochs=1, limit=3000, device="cpu")
    by_name = {r.artefact: r for r in rows}
    fp32, dense = by_name["float32 twin, dense .onnx"], by_name["K=8 slot, dense .onnx"]
    slot, tiny = by_name["K=8 slot, .slot file"], by_name["K=8 slot, self-decoding .onnx"]
    assert slot.bytes <= 101_500 and slot.ratio >= 10.5
    fixed = len(repack(F.read(slot.path), index_encoding="bits"))  # the graph's fixed-width form
    assert slot.bytes <= fixed and tiny.bytes <= 1.1 * fixed
    assert abs(dense.bytes - fp32.bytes) < 2_000  # the same float32 tensors, other metadata
    for r in rows:
        assert Path(r.path).stat().st_size == r.bytes
        assert abs(r.ort_acc - r.torch_acc) <= 0.0005, r  # onnxruntime agrees with torch
    assert dense.ort_acc == slot.ort_acc == tiny.ort_acc  # the same weights, bit for bit
    assert slot.torch_acc > 0.75 and fp32.torch_acc > 0.7  # 1 epoch on 3,000 images; chance is 0.1

    r = CliRunner().invoke(main, ["demo", "--out", str(out), "--root", str(mnist_root)])
    assert r.exit_code == 2 and "already exists" in r.output  # earlier runs are never overwritten
    r = CliRunner().invoke(
        main,
        [
            "demo",
            "--out",
            str(out),
            "--epochs",
            "1",
            "--limit",
            "1000",
            "--root",
            str(mnist_root),
            "--device",
            "cpu",
            "--force",
        ],
    )
    assert r.exit_code == 0, r.output
    for step in (  # what it is doing, and which model trains
        "training the K=8 slot network: 1 epoch on 1,000 training images",
        "training its float32 twin: 1 epoch",
        "packing the slot network into",
        "exporting lenet-k8.onnx (dense), lenet-k8.tiny.onnx (self-decoding), lenet-fp32.onnx",
        "evaluating the four files on the 10,000 test images in onnxruntime",
        "smaller than fp32",
    ):
        assert step in r.output, step
    assert "1 epochs" not in r.output
    for name in (
        "float32 twin, dense .onnx",
        "K=8 slot, .slot file",
        "K=8 slot, self-decoding .onnx",
    ):
        assert name in r.output
    slot_line = next(line for line in r.output.splitlines() if line.startswith("K=8 slot, .slot"))
    ratio = float(next(word for word in slot_line.split() if word.endswith("x"))[:-1])
    assert ratio > 10.5  # smaller than the 3 bits per connection of fixed-width indices
    assert (out / "notes.txt").read_text() == "mine"  # --force replaced only the demo's files
