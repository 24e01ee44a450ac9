"""Disk size of the runtime-only install (``pip install slotpack``) against the full one.

    python -m benchmarks.install_size            # builds the wheel, a fresh venv, installs it

The runtime side is measured for real: the project's wheel is built without dependencies, a
fresh venv (``python -m venv``) installs it with its dependencies from the package index, and
torch must not be importable there. The full install is this environment's copy of what
``slotpack[train]`` requires (this tree's pyproject.toml): the files (each distribution's
RECORD) of every distribution those requirements pull in, so the
tools a developer also has installed are not counted. Both sides are counted the same way
(``closure_bytes``); the runtime venv's whole folder (pip included) is recorded too.
``pack_time`` rows of the same record come from ``benchmarks.pack_run``.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

from benchmarks.common import write_record

ROOT = Path(__file__).resolve().parents[1]
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the venv sees what it installed
CUDA_PREFIXES = ("nvidia-", "cuda-", "triton")
SOURCES = ("pyproject.toml", "README.md", "slotpack", "runtime", "converters")


def closure_bytes(requirements: list[str]) -> dict:
    """Bytes on disk of the installed distributions ``requirements`` pull in, by name.

    Self-contained (stdlib and pip's vendored packaging), so any venv's Python can run it."""
    from importlib import metadata

    from pip._vendor.packaging.requirements import Requirement

    def norm(name: str) -> str:
        return name.lower().replace("_", "-").replace(".", "-")

    sizes: dict[str, int] = {}
    todo = [(Requirement(r), ()) for r in requirements]
    while todo:
        req, extras = todo.pop()
        if req.marker is not None and not any(
            req.marker.evaluate({"extra": e}) for e in (extras or ("",))
        ):
            continue
        name = norm(req.name)
        if name in sizes:
            continue
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        files = [dist.locate_file(f) for f in dist.files or ()]
        sizes[name] = sum(p.stat().st_size for p in files if Path(p).is_file())
        wanted = tuple(req.extras)
        for sub in dist.requires or ():
            todo.append((Requirement(sub), wanted))
    return sizes


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def build_wheel(dest: Path) -> Path:
    """The project's wheel (no dependencies), built from a copy of its sources in ``dest``."""
    src = dest / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    out = dest / "wheel"
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*cmd, "-w", str(out), str(src)], check=True, timeout=600)
    (wheel,) = out.glob("slotpack-*.whl")
    return wheel


def runtime_venv(wheel: Path, dest: Path) -> Path:
    """A fresh venv with ``wheel`` and its dependencies installed; returns its bin folder."""
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, timeout=300)
    bin_ = dest / ("Scripts" if sys.platform == "win32" else "bin")
    pip = [str(bin_ / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, str(wheel)], check=True, timeout=1200)
    return bin_


def venv_closure(bin_: Path, requirement: str) -> dict:
    code = (
        inspect.getsource(closure_bytes)
        + f"\nimport json\nprint(json.dumps(closure_bytes({requirement!r})))"
    )
    code = "from pathlib import Path\n" + code
    out = subprocess.run(
        [str(bin_ / "python"), "-c", code],
        capture_output=True, text=True, check=True, timeout=300, env=ENV,
    )  # fmt: skip
    return json.loads(out.stdout)


def measure(folder: Path) -> dict:
    wheel = build_wheel(folder)
    venv = folder / "venv"
    bin_ = runtime_venv(wheel, venv)
    torch = subprocess.run(
        [str(bin_ / "python"), "-c", "import torch"], capture_output=True, env=ENV
    )
    runtime = venv_closure(bin_, ["slotpack"])
    # This tree's requirements (an installed slotpack's metadata may be another version's).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    full = closure_bytes([*project["dependencies"], *project["optional-dependencies"]["train"]])
    row = {
        "wheel_bytes": wheel.stat().st_size,
        "torch_importable_in_runtime_venv": torch.returncode == 0,
        "runtime_bytes": sum(runtime.values()),
        "runtime_venv_folder_bytes": folder_bytes(venv),
        "full_bytes": sum(full.values()),
        "runtime_distributions": runtime,
        "full_distributions": full,
    }
    row["ratio"] = row["runtime_bytes"] / row["full_bytes"]
    # PyPI's Linux torch brings CUDA libraries and triton; without them, the CPU-only figure.
    cpu = {n: b for n, b in full.items() if not n.startswith(CUDA_PREFIXES)}
    row["full_bytes_without_cuda"] = sum(cpu.values())
    row["ratio_without_cuda"] = row["runtime_bytes"] / row["full_bytes_without_cuda"]
    return row


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="slotpack-install-") as tmp:
        row = measure(Path(tmp))
    print(
        f"runtime install {_mib(row['runtime_bytes'])} (venv folder "
        f"{_mib(row['runtime_venv_folder_bytes'])}), full install {_mib(row['full_bytes'])}: "
        f"{row['ratio']:.3f}x (without CUDA libraries and triton {_mib(row['full_bytes_without_cuda'])}: "
        f"{row['ratio_without_cuda']:.3f}x); torch importable in the runtime venv: "
        f"{row['torch_importable_in_runtime_venv']}"
    )
    path = write_record("install_size", {"kind": "install_size", **row})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
