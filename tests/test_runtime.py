"""The torch-free runtime: rebuild and unpack run with torch made unimportable."""

import io
import json
import math
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save

from slotpack import format as F
from slotpack import models
from slotpack.errors import ConfigError, OutputExistsError
from slotpack.pack import pack_model
from slotpack.runtime import iter_arrays, predict, rebuild, save_arrays, unpack
from slotpack.runtime.rebuild import layout
from tests.helpers import one_line_failure, run_capped, trained_like

LINUX = pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_AS and /proc")

NO_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


@pytest.fixture(scope="module")
def conv6_file(tmp_path_factory):
    model = models.create("conv6", 8, seed=21)
    with torch.no_grad():
        for m in model.weighted_layers():
            m.scores.uniform_()
    path = tmp_path_factory.mktemp("rt") / "conv6.slot"
    F.write(path, pack_model(model)[0])
    model.eval()
    expected = {
        f"{p}.weight": m.weight().detach().numpy()
        for p, m in enumerate(model)
        if hasattr(m, "scores")
    }
    return path, expected


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", NO_TORCH + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_torch_really_is_blocked():
    r = _run("import torch")
    assert r.returncode != 0 and "import of torch halted" in r.stderr


def test_rebuild_without_torch(conv6_file, tmp_path):
    path, expected = conv6_file
    out = tmp_path / "w.npz"
    r = _run(f"""
        import numpy as np
        from slotpack.runtime import rebuild
        w = rebuild({str(path)!r})
        np.savez({str(out)!r}, **w)
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules if sys.modules[m])
        print("ok", len(w))
    """)
    assert r.returncode == 0, r.stderr
    got = np.load(out)
    assert set(got.files) == set(expected)
    for name, value in expected.items():
        assert np.array_equal(got[name].view(np.uint32), value.view(np.uint32))


def test_unpack_cli_without_torch(conv6_file, tmp_path):
    path, expected = conv6_file
    out = tmp_path / "conv6.safetensors"
    r = _run(f"""
        from slotpack.cli import main
        main(["unpack", {str(path)!r}, "-o", {str(out)!r}], standalone_mode=False)
        main(["inspect", {str(path)!r}, "--json", "--verify"], standalone_mode=False)
    """)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["checksums_verified"] and report["total"]["connections"] == 1_474_752
    arrays = load_file(out)
    for name, value in expected.items():
        assert np.array_equal(arrays[name], value)


def _cli_without_torch(*args, cwd=None) -> subprocess.CompletedProcess:
    """``slotpack ARGS`` as a user runs it, in a Python where ``import torch`` fails."""
    code = NO_TORCH + "from slotpack.cli import main\nmain(prog_name='slotpack')\n"
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def lenet_file(tmp_path_factory):
    model = trained_like(models.create("lenet300100", 8, seed=4))
    path = tmp_path_factory.mktemp("rt") / "lenet.slot"
    F.write(path, pack_model(model, metadata={"dataset": "mnist"})[0])
    return path


def test_runtime_commands_without_torch(lenet_file, mnist_root, tmp_path):
    """Every command that only reads files runs with torch unimportable, and gives what the
    same command gives with torch (eval: the accuracy onnxruntime gets on the torch data path)."""
    from PIL import Image

    from slotpack import data
    from slotpack.runtime import evaluate, session

    d = tmp_path
    for args in (
        ["inspect", lenet_file, "--verify"],
        ["unpack", lenet_file, "-o", d / "w.npz"],
        ["export", lenet_file, "-o", d / "dense.onnx"],
        ["export", lenet_file, "-o", d / "tiny.onnx", "--self-decoding"],
        ["pack", lenet_file, "-o", d / "bits.slot", "--encoding", "bits"],
    ):
        r = _cli_without_torch(*args)
        assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(d / "w.npz")["1.weight"], rebuild(lenet_file)["1.weight"])
    assert rebuild(d / "bits.slot").keys() == rebuild(lenet_file).keys()
    test = data.load("mnist", mnist_root, "test", limit=500)  # torch's data path
    x, y = test.x.numpy(), test.y.numpy()
    want = evaluate(session(lenet_file), x, y).accuracy
    for target in (lenet_file, d / "dense.onnx", d / "tiny.onnx", d / "bits.slot"):
        r = _cli_without_torch("eval", target, "--root", mnist_root, "--limit", 500, "--json")
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        assert record["accuracy"] == want and record["count"] == 500, target
    Image.fromarray(x[0, 0]).save(d / "digit.png")
    r = _cli_without_torch("predict", d / "tiny.onnx", d / "digit.png", "--json")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)["predictions"][0]["class"]
    assert got == int(np.argmax(predict(session(lenet_file), normalize_mnist(x[:1]))))


def normalize_mnist(x_uint8):
    from slotpack.datafiles import spec
    from slotpack.runtime.session import normalize

    s = spec("mnist")
    return normalize(x_uint8, np.float32(s.mean), np.float32(s.std))


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--model", "lenet300100", "--out", "run"],
        ["data", "mnist"],
        ["demo", "--out", "demo"],
        ["finetune", "run", "--out", "ft"],
        ["eval", "run"],
        ["pack", "run", "-o", "x.slot"],
    ],
    ids=lambda args: args[0],
)
def test_training_commands_without_torch_name_the_install(args, tmp_path):
    (tmp_path / "run").mkdir()
    r = _cli_without_torch(*args, cwd=tmp_path)
    one_line_failure(r, f"`slotpack {args[0]}` needs torch", "pip install 'slotpack[train]'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written


def test_save_arrays_formats_and_refusals(tmp_path):
    arrays = {"1.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}
    npz = save_arrays(arrays, tmp_path / "a.npz")
    assert np.array_equal(np.load(npz)["1.weight"], arrays["1.weight"])
    st = save_arrays(arrays, tmp_path / "a.safetensors", metadata={"source": "test"})
    assert np.array_equal(load_file(st)["1.weight"], arrays["1.weight"])
    with pytest.raises(OutputExistsError):
        save_arrays({"x": np.zeros(1, np.float32)}, st)
    assert np.array_equal(load_file(st)["1.weight"], arrays["1.weight"])  # untouched
    with pytest.raises(ConfigError, match=".safetensors or .npz"):
        save_arrays(arrays, tmp_path / "a.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "a.safetensors"]


def test_rebuild_accepts_a_decoded_file(conv6_file):
    path, expected = conv6_file
    slot = F.read(path)
    assert rebuild(slot).keys() == rebuild(path).keys() == expected.keys()


def test_source_checkout_imports_without_installation(tmp_path):
    """``PYTHONPATH=<checkout>`` (as on a lent GPU machine) finds slotpack.runtime/converters."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        import sys
        sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        sys.path.insert(0, {str(root)!r})
        import slotpack.runtime, slotpack.converters.onnx
        print(slotpack.runtime.__file__, slotpack.converters.onnx.__file__)
    """),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [
        str(root / "runtime" / "__init__.py"),
        str(root / "converters" / "onnx.py"),
    ]


# ----------------------------------------------------------------------------- large files


def test_unpack_writes_what_the_libraries_write(conv6_file, tmp_path):
    """Streaming changes how the files are written, not what is in them."""
    path, expected = conv6_file
    arrays = rebuild(path)
    assert layout(path) == {name: a.shape for name, a in arrays.items()}  # layer order
    names = [name for name, _ in iter_arrays(path)]
    assert names == list(arrays) and names[:2] == ["0.weight", "2.weight"]
    st = tmp_path / "w.safetensors"
    assert unpack(path, st) == layout(path)
    assert st.read_bytes() == save(arrays)
    npz = tmp_path / "w.npz"
    unpack(path, npz)
    reference = io.BytesIO()
    np.savez(reference, **arrays)
    with zipfile.ZipFile(npz) as ours, zipfile.ZipFile(reference) as theirs:
        assert ours.namelist() == theirs.namelist()
        assert all(ours.read(n) == theirs.read(n) for n in ours.namelist())
    with pytest.raises(OutputExistsError):
        unpack(path, npz)
    with pytest.raises(ConfigError, match=".safetensors or .npz"):
        unpack(path, tmp_path / "w.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.npz", "w.safetensors"]


@LINUX
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_unpack_streams_a_model_larger_than_its_memory(big_slot_file, tmp_path, suffix):
    """64 MiB of dense arrays unpack with 48 MiB to spare: one array in memory at a time."""
    dense = 4 * sum(math.prod(s) for s in layout(big_slot_file).values())
    assert dense > 64 * 2**20 > 48 * 2**20
    out = tmp_path / f"big{suffix}"
    r = run_capped(48, "unpack", big_slot_file, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "5 arrays, 16,797,696 float32 values" in r.stdout
    if suffix == ".npz":
        got = np.load(out)
        read = got.__getitem__
    else:
        got = safe_open(out, "np")
        read = got.get_tensor
    for name, want in iter_arrays(big_slot_file):
        assert np.array_equal(read(name), want), name


@LINUX
def test_unpack_out_of_memory_is_one_line(big_slot_file, tmp_path):
    r = run_capped(10, "unpack", big_slot_file, "-o", tmp_path / "big.npz")
    one_line_failure(r, "out of memory rebuilding 1.weight (4,194,304 float32 values, 16.0 MiB)")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temporary file
