"""Small helpers shared by test modules (imported as ``tests.helpers``)."""

import torch


def one_line_error(result, *needles: str) -> None:
    """A CliRunner result failed with exit code 2 and exactly one ``Error:`` line naming ``needles``."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    error = [line for line in lines if line.startswith("Error:")]
    assert len(error) == 1, result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in error[0], error[0]


def states_equal(a: dict, b: dict) -> bool:
    """Two state_dicts hold the same keys, tensors (``torch.equal``) and slot layer records."""
    return a.keys() == b.keys() and all(
        torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k] for k, v in a.items()
    )


def trained_like(model, seed: int = 0):
    """Random scores, biases and BatchNorm statistics, so selections and tensors are not the
    initial ones; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "scores"):
                m.scores.copy_(torch.rand(m.scores.shape, generator=g))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.01 * torch.rand(m.num_features, generator=g) + 0.005)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    return model.eval()


def big_slot(n: int = 2048, copies: int = 4, seed: int = 1) -> bytes:
    """A valid K=2 ``.slot`` file whose dense form is large but cheap to make: ``copies`` square
    Linear(n, n) layers and a Linear(n, 10) head on a [1, 1, n] input, random 1-bit indices
    (n=2048, copies=4: 16 MiB of float32 per square layer, 64 MiB in all, from a 2 MiB file)."""
    import numpy as np

    from slotpack import arch as A
    from slotpack import format as F

    layers = (A.Flatten(), *[A.Linear(n, n) for _ in range(copies)], A.Linear(n, 10))
    rng = np.random.default_rng(seed)
    blobs = {}
    for pos, layer in enumerate(layers[1:], start=1):
        count = layer.in_features * layer.out_features
        blobs[f"{pos}.indices"] = ("bits", (count,), rng.bytes(count // 8))
    return F.encode(
        layers=layers,
        seed=seed,
        k=2,
        selection="greedy",
        input_shape=(1, 1, n),
        mean=(0.5,),
        std=(0.25,),
        num_classes=10,
        blobs=blobs,
        metadata={"dataset": "mnist"},
    )


# Runs the CLI under an address-space limit of (its size after importing everything it will
# import) + argv[1] MiB, so the limit measures what the command allocates, not the interpreter.
_CAPPED = """
import resource, sys
import numpy, onnx, zipfile
import slotpack.cli, slotpack.converters.onnx, slotpack.runtime
def size():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
limit = size() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
slotpack.cli.main(sys.argv[2:], prog_name="slotpack")
"""


def run_capped(budget_mib: int, *args, cwd=None):
    """``slotpack *args`` in a subprocess that may allocate only ``budget_mib`` MiB more than
    its imports took (Linux: RLIMIT_AS and /proc). Returns the CompletedProcess."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", _CAPPED, str(budget_mib), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env=env,
    )


def one_line_failure(result, *needles: str) -> None:
    """A subprocess CLI run failed with exit code 2 and one ``Error:`` line naming ``needles``."""
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def synthetic_cifar10(root, seed: int = 0) -> None:
    """Random CIFAR-10-shaped data under ``root`` in the offline layout (benchmarks/
    cifar10_offline.py's pickles and marker): one training batch of 10,000 images and a test
    batch of 1,000, each file's sha256 in the marker."""
    import hashlib
    import json
    import pickle
    from pathlib import Path

    import numpy as np

    from benchmarks.cifar10_offline import _batch
    from slotpack import sources

    folder = Path(root) / sources.CIFAR10_FOLDER
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    blobs = {
        "data_batch_1": _batch(rng.integers(0, 256, (10_000, 3072), dtype=np.uint8),
                               rng.integers(0, 10, 10_000).tolist(), "synthetic", "train", 0),
        "test_batch": _batch(rng.integers(0, 256, (1_000, 3072), dtype=np.uint8),
                             rng.integers(0, 10, 1_000).tolist(), "synthetic", "test", 0),
        "batches.meta": pickle.dumps({"label_names": list(sources.CIFAR10_LABEL_NAMES)}),
    }  # fmt: skip
    for name, blob in blobs.items():
        (folder / name).write_bytes(blob)
    marker = {
        "format": sources.CIFAR10_MARKER_FORMAT,
        "version": sources.CIFAR10_MARKER_VERSION,
        "train_batches": ["data_batch_1"],
        "test_batch": "test_batch",
        "files": {name: {"sha256": hashlib.sha256(blob).hexdigest()} for name, blob in blobs.items()},
    }
    (folder / sources.CIFAR10_MARKER).write_text(json.dumps(marker))
