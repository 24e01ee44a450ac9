"""JSON records for benchmark results: every number in RESULTS.md comes from one of these files."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or None
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _command() -> str:
    """The command line as a user would type it (``python -m benchmarks.x ...``)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    head = ["python", "-m", spec.name] if spec is not None else ["python", sys.argv[0]]
    return " ".join([*head, *sys.argv[1:]])


def machine() -> dict[str, Any]:
    """Where a measurement ran: CPU, core count, GPU (if any) and library versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    for name in ("numpy", "onnxruntime", "onnx"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            pass
    return info


def write_record(name: str, payload: dict[str, Any], folder: Path | None = None) -> Path:
    """Write ``{kind, command, commit, machine, date, **payload}`` to results/NAME.json."""
    folder = folder or Path(os.environ.get("SLOTPACK_RESULTS") or RESULTS)
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name,
        "command": _command(),
        "commit": _git_commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        **payload,
    }
    path = folder / f"{name}.json"
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def load_records(folder: Path | None = None) -> list[dict[str, Any]]:
    folder = folder or RESULTS
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
