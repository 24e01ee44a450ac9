"""Weights-only .slot files of any slotified model (docs/FORMAT.md §2.8): save, load_state_dict
into the dense twin bit for bit, torch-free loading, the CLI on such files, malformed manifests
and fuzzed files."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import slotpack
from slotpack import format as F
from slotpack.cli import main
from slotpack.runtime import load_state_dict as load_arrays
from tests.test_format_v2 import HEADER, build, mutate, section, split


class Net(nn.Module):
    """A bit of everything a state_dict holds: conv with BatchNorm (and its int64 batch count),
    a non-square depthwise conv, Conv1d, LayerNorm, an embedding-free MLP head with GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, (3, 5), padding="same")
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, groups=8, bias=False)
        self.seq = nn.Conv1d(8, 6, 4, padding="same", dilation=2)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(torch.relu(self.bn(self.conv(x))))
        x = self.seq(x.flatten(2)).mean(2)
        return self.head(self.norm(x))


def run_cli(args: list[str]):
    return CliRunner().invoke(main, [str(a) for a in args])


def trained(k=(8, 4, 8, 2, 16), seed=3) -> nn.Module:
    """A slotified Net whose selection moved off the reference for some connections, as
    training would: random score bumps, and BatchNorm statistics that are not the defaults."""
    torch.manual_seed(seed)
    model = slotpack.slotify(Net(), k=list(k), seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in slotpack.slot_layers(model):
            bump = (torch.rand(layer.scores.shape, generator=g) < 0.1) * layer.bound
            layer.scores += bump
        model.train()
        model(torch.randn(4, 3, 8, 8, generator=g))  # running statistics and the batch count
    return model.eval()


def test_save_and_load_rebuild_the_dense_twin_bit_for_bit(tmp_path):
    model = trained()
    info = slotpack.save(model, tmp_path / "m.slot", metadata={"note": "test"})
    f = F.read(tmp_path / "m.slot")
    assert f.weights_only and f.ks == (8, 4, 8, 2, 16)
    assert [w.section for w in f.weights] == [n for n, _ in _weights(model)]
    tensors = [n for n, v in model.state_dict().items() if torch.is_tensor(v)]  # not records
    assert list(f.sections) == [_dense_name(n) for n in tensors]
    assert f.sections["bn.num_batches_tracked"].encoding == "int64"
    assert {f.sections[w.section].encoding for w in f.weights} <= {"bits", "delta"}
    index_bits = 8 * sum(f.sections[w.section].length for w in f.weights)
    assert 0 < index_bits < sum(w.count * int(np.ceil(np.log2(w.k))) for w in f.weights)
    assert info.size == len((tmp_path / "m.slot").read_bytes()) and info.connections == 880
    state = slotpack.load_state_dict(tmp_path / "m.slot")
    dense = Net()
    dense.load_state_dict(state, strict=True)
    dense.eval()
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(dense(x), model(x))
    for name, value in slotpack.dense_state_dict(model).items():
        assert torch.equal(state[name], value), name


def _weights(model):
    return [(f"{name}.weight", layer) for name, layer in slotpack.slot_layers(model)]


def _dense_name(key: str) -> str:
    return key[: -len("scores")] + "weight" if key.endswith("scores") else key


def test_torch_free_load_state_dict(tmp_path):
    model = trained()
    slotpack.save(model, tmp_path / "m.slot")
    np.savez(tmp_path / "want.npz", **{k: v.numpy() for k, v in slotpack.dense_state_dict(model).items()})  # fmt: skip
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from slotpack.runtime import load_state_dict\n"
        f"got = load_state_dict({str(tmp_path / 'm.slot')!r})\n"
        f"want = np.load({str(tmp_path / 'want.npz')!r})\n"
        "assert list(got) == list(want.files), (list(got), want.files)\n"
        "for k in got: assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k\n"
        "print('ok', len(got))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr


def test_cli_on_a_weights_only_file(tmp_path):
    slotpack.save(trained(), tmp_path / "m.slot")
    result = run_cli(["inspect", str(tmp_path / "m.slot")])
    assert (
        result.exit_code == 0
        and "head.0.weight" in result.output
        and "bn.num_batches_tracked" in result.output
    )
    for args in (["export", str(tmp_path / "m.slot"), "-o", str(tmp_path / "m.onnx")],
                 ["eval", str(tmp_path / "m.slot")]):  # fmt: skip
        result = run_cli(args)
        assert result.exit_code == 2 and "no architecture" in result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "m.onnx").exists()
    result = run_cli(["unpack", str(tmp_path / "m.slot"), "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 0
    from safetensors.numpy import load_file

    got = load_file(tmp_path / "m.safetensors")
    want = load_arrays(tmp_path / "m.slot")
    assert set(got) == set(want) and got["bn.num_batches_tracked"].dtype == np.int64
    assert all(np.array_equal(got[k], want[k]) for k in want)
    for encoding in ("bits", "delta"):  # re-encoding is lossless, and auto is the smallest
        out = tmp_path / f"{encoding}.slot"
        assert run_cli(["pack", str(tmp_path / "m.slot"), "-o", str(out), "--encoding", encoding]).exit_code == 0  # fmt: skip
        again = load_arrays(out)
        assert all(np.array_equal(again[k], want[k]) for k in want)
    run_cli(["pack", str(tmp_path / "bits.slot"), "-o", str(tmp_path / "auto.slot")])
    assert (tmp_path / "auto.slot").read_bytes() == (tmp_path / "m.slot").read_bytes()


@pytest.mark.parametrize("seed", [3, 4])
def test_export_onnx_dense_and_self_decoding(tmp_path, seed):
    """onnxruntime against torch; the self-decoding graph regenerates the very weights the dense
    one stores, so their outputs agree bit for bit; batch size is dynamic."""
    import onnxruntime as ort

    model = trained(seed=seed)
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        want = model(x).numpy()
    outs = {}
    for self_decoding in (False, True):
        path = slotpack.export_onnx(model, x[:1], tmp_path / f"{self_decoding}.onnx", self_decoding=self_decoding)  # fmt: skip
        sess = ort.InferenceSession(str(path))
        outs[self_decoding] = sess.run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(outs[self_decoding], want, rtol=1e-5, atol=1e-6)
        assert np.array_equal(outs[self_decoding].argmax(1), want.argmax(1))
    assert np.array_equal(outs[False].view(np.uint32), outs[True].view(np.uint32))


def test_export_onnx_needs_slot_layers(tmp_path):
    with pytest.raises(slotpack.ConfigError, match="no slot layers"):
        slotpack.export_onnx(Net(), torch.randn(1, 3, 8, 8), tmp_path / "x.onnx")
    assert not (tmp_path / "x.onnx").exists()


def test_one_seed_and_selection_per_file():
    a = slotpack.slotify(nn.Sequential(nn.Linear(4, 4)), k=2, seed=1)
    with pytest.raises(slotpack.ConfigError, match="no slot layers"):
        slotpack.pack_module(nn.Sequential(nn.Linear(4, 4)))
    a[0].seed = 2  # a layer from another slotify call
    with pytest.raises(slotpack.ConfigError, match="one seed"):
        slotpack.pack_module(nn.Sequential(a[0], slotpack.slotify(nn.Linear(4, 4), k=2, seed=1)))


def small_file() -> bytes:
    model = slotpack.slotify(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3, bias=False)), k=[3, 5], seed=7)  # fmt: skip
    with torch.no_grad():
        model[0].scores[::4, 0] += 1.0
    model.train()
    model(torch.randn(4, 6))
    return slotpack.pack_module(model.eval())[0]


def edit(data: bytes, fn) -> bytes:
    manifest, payload = split(data)
    payload = fn(manifest, bytearray(payload))
    return build(manifest, bytes(payload))


def _set(key, value):
    return lambda m, p: m.update({key: value}) or p


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda m, p: m["weights"][0].update(name="nope") or p, "no indices section|no layer's"),
        (lambda m, p: m["weights"].append(dict(m["weights"][0])) or p, "unique"),
        (lambda m, p: m["weights"][0].update(shape=[30]) or p, "2..5 sizes"),
        (lambda m, p: m["weights"][0].update(shape=[6, 6]) or p, "indices for a weight of"),
        (lambda m, p: m["weights"][1].update(k=1) or p, "k must be"),
        (lambda m, p: m["weights"][1].update(reference="best") or p, "reference 'best'"),
        (lambda m, p: m["weights"][0].update(extra=1) or p, "unknown \\['extra'\\]"),
        (lambda m, p: m["weights"].pop() and p, "no layer's indices"),
        (_set("weights", []), "non-empty list"),
        (_set("num_classes", 3), "unknown \\['num_classes'\\]"),
        (lambda m, p: m.pop("weights") and p, "missing"),
        (lambda m, p: section(m, "1.running_mean").update(encoding="bits") or p, "no layer's indices"),
        (lambda m, p: section(m, "0.weight").update(encoding="float32") or p, "bits or delta|unknown"),
    ],
)  # fmt: skip
def test_malformed_weights_only_manifests(change, match):
    with pytest.raises(F.SlotFormatError, match=match):
        F.decode(edit(small_file(), change), verify=False)


def test_int64_sections_only_in_weights_only_files():
    from tests.test_format_v2 import tiny_v2

    def to_int64(m, p):
        section(m, "5.bias").update(encoding="int64", length=24)
        return p + bytes(12)

    with pytest.raises(F.SlotFormatError, match="encoding 'int64' is not one of"):
        F.decode(edit(tiny_v2(), to_int64), verify=False)


@pytest.mark.slow
def test_resnet18_saves_and_loads_bit_for_bit(tmp_path):
    torch.manual_seed(0)
    slot = slotpack.slotify(torchvision.models.resnet18(num_classes=10), k=8, seed=0)
    with torch.no_grad():  # a few changed selections in one layer, as training leaves
        slot.fc.scores[:, 0] += slot.fc.bound
    info = slotpack.save(slot, tmp_path / "r18.slot")
    assert info.connections == 11_172_032 and info.size < 200_000
    dense = torchvision.models.resnet18(num_classes=10)
    dense.load_state_dict(slotpack.load_state_dict(tmp_path / "r18.slot"), strict=True)
    slot.eval(), dense.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(slot(x), dense(x))


@settings(max_examples=1000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
       st.booleans())  # fmt: skip
def test_fuzz_weights_only_byte_edits(ops, fix_crcs):
    """Mutated weights-only files give the format's error, or tensors of the declared shapes."""
    try:
        f = F.decode(mutate(SMALL, ops, fix_crcs))
    except F.SlotFormatError:
        return
    arrays = load_arrays(f)
    for w in f.weights:
        assert arrays[w.section].shape == w.layer.weight_shape


SMALL = small_file()
assert json.loads(SMALL[32 : 32 + HEADER.unpack_from(SMALL)[3]])["weights"]
