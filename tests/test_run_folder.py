"""Run folders under crashes and concurrency (issue 15.8-15.12): a kill at any moment, a torn
metrics line or a full disk leaves a folder that --resume finishes consistently, a fresh run never
writes into another run's records, and two writers never share a folder."""

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from slotpack import train as T
from slotpack.cli import main
from slotpack.errors import CheckpointError
from tests.helpers import one_line_error

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="lenet300100", k=2, limit=256, eval_limit=100)


def _cfg(epochs: int) -> T.TrainConfig:
    return T.TrainConfig(**TINY, epochs=epochs)


def _epochs(run: Path) -> list[int]:
    return [r["epoch"] for r in T.iter_metrics(run)]


def _consistent(run: Path, epochs: int) -> None:
    """What every finished run folder satisfies, however often it was killed and resumed."""
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, epochs + 1))
    assert json.loads((run / "result.json").read_text())["epochs"] == epochs
    assert T.load_checkpoint(run / "last.pt")["epoch"] == epochs - 1
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def _cli(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _train_args(run: Path, root: Path, epochs: int, *extra) -> list:
    return [
        "train", "--model", "lenet300100", "--k", "2", "--limit", "256", "--eval-limit", "100",
        "--epochs", epochs, "--device", "cpu", "--root", root, "--out", run, *extra,
    ]  # fmt: skip


class _Killed(BaseException):
    """Stands for a kill: nothing after it runs (no except Exception catches it)."""


def test_kill_before_the_first_last_pt_resumes_from_the_start(mnist_root, tmp_path, monkeypatch):
    """Issue 15.8: killed between the first metrics line and the first last.pt, --resume said
    "nothing to resume" and a fresh run appended to the old metrics: epochs [1, 1, 2, 3]."""
    run, save = tmp_path / "run", T._atomic_save

    def killed_at_last_pt(obj, path):
        if path.name == "last.pt":
            raise _Killed
        save(obj, path)

    monkeypatch.setattr(T, "_atomic_save", killed_at_last_pt)
    with pytest.raises(_Killed):
        T.train(_cfg(2), run, root=mnist_root, device="cpu")
    monkeypatch.setattr(T, "_atomic_save", save)
    assert _epochs(run) == [1] and not (run / "last.pt").exists()
    with pytest.raises(CheckpointError, match="already holds a run.*--resume"):
        T.train(_cfg(2), run, root=mnist_root, device="cpu")
    with pytest.raises(CheckpointError, match="different config"):
        T.train(T.TrainConfig(**{**TINY, "k": 4}, epochs=2), run, root=mnist_root, resume=True)
    T.train(_cfg(2), run, root=mnist_root, device="cpu", resume=True)
    _consistent(run, 2)


_KILLER = """
import os, signal, sys
from slotpack import train as T

save, write = T._atomic_save, T._Writer.write

def write_then_die(self, data):
    write(self, data)  # part of the checkpoint is on disk, in a temporary
    os.kill(os.getpid(), signal.SIGKILL)

def save_or_die(obj, path):
    if path.name == "last.pt" and obj["epoch"] == 1:
        T._Writer.write = write_then_die
    save(obj, path)

T._atomic_save = save_or_die
cfg = T.TrainConfig(model="lenet300100", k=2, limit=256, eval_limit=100, epochs=3)
T.train(cfg, sys.argv[1], root=sys.argv[2], device="cpu")
"""


@pytest.mark.slow
def test_kill_9_while_writing_a_checkpoint(mnist_root, tmp_path):
    """Issues 15.8, 15.9, 15.12 with a real SIGKILL in the middle of epoch 2's last.pt: the torn
    temporary stays until the folder is next written, the dead run's lock blocks nobody, a fresh
    run is refused, and --resume ends with metrics and result in agreement."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", _KILLER, run, mnist_root], env=env, timeout=120)
    assert done.returncode == -signal.SIGKILL
    (stale,) = [p for p in run.iterdir() if p.name.startswith(".last.pt.")]
    assert stale.stat().st_size > 0 and (run / ".lock").exists()
    assert _epochs(run) == [1, 2] and T.load_checkpoint(run / "last.pt")["epoch"] == 0
    one_line_error(_cli(*_train_args(run, mnist_root, 3)), "already holds a run", "--resume")
    T.train(_cfg(3), run, root=mnist_root, device="cpu", resume=True)
    assert not stale.exists()
    _consistent(run, 3)


def test_a_torn_metrics_line_is_dropped_and_corruption_elsewhere_is_one_line(mnist_root, tmp_path):
    """Issue 15.10: a partial append blocked --resume with a JSONDecodeError traceback."""
    run = tmp_path / "run"
    T.train(_cfg(1), run, root=mnist_root, device="cpu")
    metrics = run / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 2, "lr": 0.1, "train_lo')  # torn by a crash
    assert _epochs(run) == [1]
    assert _cli(*_train_args(run, mnist_root, 2, "--resume")).exit_code == 0
    _consistent(run, 2)
    metrics.write_text('{"epoch": 1, "lr": 0.1, "tra\n' + good)  # not the last line: corrupt
    with pytest.raises(CheckpointError, match="line 1 is not an epoch record"):
        list(T.iter_metrics(run))
    r = _cli(*_train_args(run, mnist_root, 3, "--resume"))
    one_line_error(r, "metrics.jsonl line 1", "corrupt")
    metrics.write_text(good)  # a record missing (epoch 2) is inconsistent with last.pt
    one_line_error(_cli(*_train_args(run, mnist_root, 3, "--resume")), "holds epochs [1]")


@pytest.fixture()
def file_size_limit():
    """This process may not write files over 64 KiB (like a disk that fills up): writes past it
    fail with EFBIG instead of raising SIGXFSZ."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, old_limit[1]))
    yield lambda: resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
    signal.signal(signal.SIGXFSZ, old_handler)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_resumable(
    mnist_root, tmp_path, file_size_limit
):
    """Issue 15.11: torch.save on a full disk raised "[enforce fail at inline_container.cc]"."""
    run = tmp_path / "run"
    r = _cli(*_train_args(run, mnist_root, 1))
    one_line_error(r, f"{run / 'best.pt'}: File too large")
    assert "enforce fail" not in r.output
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []
    file_size_limit()  # space again
    assert _cli(*_train_args(run, mnist_root, 1, "--resume")).exit_code == 0
    _consistent(run, 1)


_HOLDER = """
import sys, time
from slotpack import atomic
with atomic.exclusive(sys.argv[1], "run folder"):
    print("locked", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_of_a_run_folder_is_refused(mnist_root, tmp_path):
    """Issue 15.12: two trainings into one --out both ran and interleaved their records."""
    run = tmp_path / "run"
    run.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, run / ".lock"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in ((), ("--resume",)):
            r = _cli(*_train_args(run, mnist_root, 1, *extra))
            one_line_error(r, f"run folder {run} is being written by another process")
            assert f"pid {holder.pid}" in r.output
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing was written
    finally:
        holder.kill()
        holder.wait(timeout=10)
        holder.stdout.close()
