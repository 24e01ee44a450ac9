"""Atomic outputs: no overwrite without force (even racing), umask and modes, stale temporaries
of killed writers, and the lock that keeps one writer per run folder."""

import errno
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from slotpack import atomic
from slotpack.errors import InUseError, OutputExistsError

REPO = Path(__file__).resolve().parents[1]


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _temporaries(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def _python(code: str, *args) -> subprocess.Popen:
    """A child python (slotpack importable, no torch needed) that prints one line when ready."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True, env=env
    )
    child.ready = child.stdout.readline().strip()  # type: ignore[attr-defined]
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=10)
    child.stdout.close()


def test_a_writer_racing_in_after_the_check_does_not_get_replaced(tmp_path):
    """Issue 15.13: the existence check passes for both, the second writer finishes first; the
    first must then fail rather than silently replace it (it used os.replace)."""
    path = tmp_path / "m.slot"
    with pytest.raises(OutputExistsError, match="pass --force"):
        with atomic.replacing(path, force=False) as tmp:
            tmp.write_bytes(b"first")
            atomic.write_bytes(path, b"second", force=False)
    assert path.read_bytes() == b"second"
    assert _temporaries(tmp_path) == []


def test_concurrent_writers_without_force_exactly_one_wins(tmp_path):
    path, n = tmp_path / "out.onnx", 8
    start, outcome = threading.Barrier(n), {}

    def write(i: int) -> None:
        start.wait()
        try:
            atomic.write_bytes(path, b"writer %d" % i, force=False)
            outcome[i] = "ok"
        except OutputExistsError:
            outcome[i] = "exists"

    threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (winner,) = [i for i, o in outcome.items() if o == "ok"]
    assert sorted(outcome.values()).count("exists") == n - 1
    assert path.read_bytes() == b"writer %d" % winner
    assert _temporaries(tmp_path) == []


def test_without_hard_links_a_new_file_is_still_written(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "link", no_links)
    atomic.write_bytes(tmp_path / "a.bin", b"a", force=False)
    assert (tmp_path / "a.bin").read_bytes() == b"a"
    with pytest.raises(OutputExistsError):
        atomic.write_bytes(tmp_path / "a.bin", b"b", force=False)


@pytest.fixture()
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_new_files_follow_the_umask_and_replaced_files_keep_their_mode(tmp_path, umask_027):
    """Issue 15.14: outputs were forced to 0644, so --force over a 0600 file published it."""
    new = atomic.write_bytes(tmp_path / "new.slot", b"x", force=False)
    assert _mode(new) == 0o640
    private = tmp_path / "private.slot"
    private.write_bytes(b"secret")
    os.chmod(private, 0o600)
    atomic.write_bytes(private, b"replaced", force=True)
    assert private.read_bytes() == b"replaced" and _mode(private) == 0o600
    os.umask(0o022)
    assert _mode(atomic.write_bytes(tmp_path / "shared.slot", b"x")) == 0o644


def test_killed_writers_temporaries_are_removed_by_the_next_write(tmp_path):
    """Issue 15.9: kill -9 during a write left `.x.onnx.*.tmp` forever."""
    child = _python(
        "import sys, time\n"
        "from slotpack import atomic\n"
        "with atomic.replacing(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'half of a model')\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n",
        tmp_path / "x.onnx",
    )
    stale = Path(child.ready)
    assert stale.parent == tmp_path and stale.name.startswith(".x.onnx.")
    _kill(child)
    assert stale.exists() and not (tmp_path / "x.onnx").exists()
    (tmp_path / ".notes.tmp").write_text("not ours")  # other programs' files are left alone
    with atomic.replacing(tmp_path / "live.slot") as live:  # a live writer's temporary stays
        live.write_bytes(b"in progress")
        atomic.write_bytes(tmp_path / "y.slot", b"y")
        assert not stale.exists()
        assert live.exists()
    assert _temporaries(tmp_path) == [".notes.tmp"]
    assert (tmp_path / "live.slot").read_bytes() == b"in progress"


def test_a_failed_write_names_the_target_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "m.slot"
    with pytest.raises(OSError) as info:
        with atomic.replacing(path):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert info.value.filename == str(path) and info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_one_holder_per_lock_and_a_dead_holder_never_blocks(tmp_path):
    """Issue 15.12's lock: a second holder is refused, a killed one releases it."""
    lock = tmp_path / ".lock"
    with atomic.exclusive(lock, "run folder r"):
        with pytest.raises(InUseError, match=f"run folder r is being written.*pid {os.getpid()}"):
            with atomic.exclusive(lock, "run folder r"):
                pass
    child = _python(
        "import sys, time\n"
        "from slotpack import atomic\n"
        "with atomic.exclusive(sys.argv[1], 'r'):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n",
        lock,
    )
    assert child.ready == "locked"
    with pytest.raises(InUseError, match=f"pid {child.pid}"):
        with atomic.exclusive(lock, "r"):
            pass
    _kill(child)
    with atomic.exclusive(lock, "r"):  # the kernel dropped the dead process's lock
        assert lock.read_text() == f"{os.getpid()}\n"
