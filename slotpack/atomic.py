"""Atomic file output: a temporary file in the target's folder, put in place when complete.

Readers never see a half-written file, and a failure leaves any earlier file untouched.

- **No overwrite without force, even under concurrent writers:** without ``force`` the finished
  temporary is hard-linked to the target, which fails if the target exists however it got
  there; only on file systems without hard links is this a check followed by a rename.
- **Modes:** a new file gets ``0o666 & ~umask`` (the kernel applies the umask and default ACLs);
  a replaced file keeps the mode of the file it replaces.
- **Temporaries:** ``.<name>.<random>.slotpack.tmp`` beside the target, held under an exclusive
  ``flock`` by their writer for as long as it writes. A killed writer's lock dies with it, so
  every later write into the folder removes the temporaries nobody holds (``clean_stale``).
- **Output names:** ``check_output`` is what a command checks before any work: ``-o`` names a
  file (not a folder, no trailing slash) in a folder that exists, never one of the inputs.
- **Locks:** ``exclusive`` holds a lock file for a block (one writer per run folder); a lock of a
  dead process never blocks, because the kernel releases ``flock`` locks with their process.

This targets POSIX systems; without ``fcntl`` (Windows) locks and cleaning are skipped, and
the rest is untested there.
"""

from __future__ import annotations

import errno
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConfigError, InUseError, OutputExistsError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

TMP_SUFFIX = ".slotpack.tmp"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)  # descriptors (and their locks) stay out of subprocesses
# os.link fails with these where a file system has no hard links: fall back to rename.
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; False if another holds it."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def clean_stale(folder: Path | str) -> list[Path]:
    """Remove the temporaries of dead writers in ``folder``; return what was removed.

    Only names of our pattern (``.*.slotpack.tmp``) whose ``flock`` can be taken, i.e. whose writer
    is gone, are removed; anything else (other programs' files, live writers) is left alone."""
    folder = Path(folder)
    removed: list[Path] = []
    if fcntl is None:  # pragma: no cover - Windows: no way to tell a live writer from a dead one
        return removed
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".") and n.endswith(TMP_SUFFIX)]
    except OSError:
        return removed
    for name in names:
        path = folder / name
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not _try_lock(fd) or not os.path.samestat(st, os.stat(path, follow_symlinks=False)):
                continue
            os.unlink(path)  # unlinked while locked: a writer that locks it next sees nlink 0
            removed.append(path)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _create_temporary(path: Path) -> tuple[Path, int]:
    """A new, locked, empty temporary beside ``path``: its name and the descriptor holding the lock."""
    stem = path.name[:200]  # room for the random part within NAME_MAX
    while True:
        tmp = path.parent / f".{stem}.{secrets.token_hex(4)}{TMP_SUFFIX}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _CLOEXEC, 0o666)  # & ~umask
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleaner is about to unlink it
        if os.fstat(fd).st_nlink > 0:
            return tmp, fd
        os.close(fd)  # a cleaner removed it between our open and our lock: take another name


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | _CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def _put_in_place(tmp: Path, path: Path, force: bool) -> None:
    if force:
        try:
            os.chmod(tmp, os.stat(path).st_mode & 0o7777)  # a replaced file keeps its mode
        except FileNotFoundError:
            pass
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if ``path`` exists, whoever created it and when
    except FileExistsError:
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it") from None
    except OSError as exc:
        if exc.errno not in _NO_LINKS:
            raise
        if os.path.lexists(path):  # no hard links here: the check and the rename are two steps
            raise OutputExistsError(f"{path} exists; pass --force to overwrite it") from None
        os.replace(tmp, path)


@contextmanager
def replacing(path: Path | str, *, force: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; it becomes ``path`` only if the block succeeds.

    Without ``force`` an existing ``path`` is an error, checked before the block and again,
    atomically, when the file is put in place. Stale temporaries in the folder are removed."""
    path = Path(path)
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{path} exists; pass --force to overwrite it")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale(path.parent)
        tmp, fd = _create_temporary(path)
    except OSError as exc:  # name the file the user asked for, not our temporary one
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    try:
        try:
            yield tmp
            os.fsync(fd)  # the data is on disk before the name points at it
            _put_in_place(tmp, path, force)
        except OSError as exc:
            if exc.filename not in (None, str(tmp)):
                raise
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        _fsync_folder(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)
        os.close(fd)


def check_output(
    output: Path | str,
    *,
    inputs: tuple[Path | str, ...] = (),
    force: bool = False,
    suffix: str = "",
    stem: str | None = None,
) -> Path:
    """Check an output file name before any work; return it as a Path.

    ConfigError if it names a folder (an existing one, or any name ending in a slash), if its
    folder does not exist (nothing creates it silently), or if it is one of ``inputs`` (the same
    file, also through a symlink or hard link), which even ``force`` never overwrites;
    OutputExistsError if it exists without ``force``. ``stem`` (default: the first input's) and
    ``suffix`` make the hint for a folder concrete."""
    text = os.fspath(output)
    path = Path(text)
    seps = tuple(s for s in (os.sep, os.altsep) if s)
    if text.endswith(seps) or path.is_dir():
        stem = stem or (Path(os.fspath(inputs[0])).stem if inputs else "model")
        example = Path(text.rstrip("".join(seps)) or ".") / f"{stem}{suffix or '.out'}"
        raise ConfigError(f"{text} is a folder; name the file to write in it, e.g. -o {example}")
    folder = path.parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise ConfigError(f"cannot write {text}: folder {folder} {what}; create it first")
    for source in inputs:
        try:
            same = os.path.samefile(source, path)
        except OSError:  # one of them does not exist (or cannot be looked at): not the same
            same = False
        if same:
            raise ConfigError(
                f"{text} is the input file {os.fspath(source)}; the output must be another file "
                "(even with --force)"
            )
    if not force and os.path.lexists(path):
        raise OutputExistsError(f"{text} exists; pass --force to overwrite it")
    return path


def write_bytes(path: Path | str, data: bytes, *, force: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically; with ``force=False`` an existing file is an error."""
    with replacing(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


@contextmanager
def exclusive(lock_path: Path | str, what: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created if missing) for the block.

    A second holder, in this process or another, gets ``InUseError`` naming ``what`` and the
    holder's process id; the lock dies with its process, so a killed holder never blocks.
    The lock file stays (removing it would let two writers lock two different files)."""
    lock_path = Path(lock_path)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o666)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(lock_path)) from None
    try:
        if not _try_lock(fd):
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InUseError(
                f"{what} is being written by another process (pid {holder}); "
                "wait for it to finish or choose another folder"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
