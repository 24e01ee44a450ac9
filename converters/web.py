"""A static web page that runs a ``.slot`` model in the browser (``slotpack export --web DIR``).

The folder holds the self-decoding ONNX export (``model.onnx``: seed + packed indices, the weights
are regenerated when the session is created), ``model.json`` (input shape, normalisation, class
names), the page (``index.html``, ``app.js``, from ``runtime/web/``) and onnxruntime-web's wasm
build under ``ort/``, copied from its npm package: the page loads nothing from anywhere else and
works from any static server. It uses the wasm backend, single-threaded: WebGPU has no uint64,
and threads need cross-origin isolation headers that a plain static server does not send.

onnxruntime-web is not a Python package, so its files come from npm, pinned by
``runtime/web/package.json`` and ``package-lock.json``: ``npm ci --prefix runtime/web`` in a
checkout, or ``npm install onnxruntime-web@<PINNED>`` anywhere and ``--ort-web`` /
``$SLOTPACK_ORT_WEB`` naming the package folder.

The folder is built beside its target under a temporary name and renamed into place when
complete, so a failure leaves no partial folder. An existing folder is replaced only with
``force`` and only if it is an earlier page of ours (its ``model.json`` says so); an empty
folder is filled without ``force``.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from slotpack import __version__
from slotpack import format as F
from slotpack.datafiles import class_names
from slotpack.errors import ConfigError, OutputExistsError, SlotpackError

PINNED = "1.30.0"  # the version runtime/web/package.json pins; the page is tested with it
ENV = "SLOTPACK_ORT_WEB"
PAGE_FILES = ("index.html", "app.js")
# The UMD bundle of the wasm backend, and the one wasm binary (plus its loader) it fetches.
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.wasm", "ort-wasm-simd-threaded.mjs")
MARKER = "slotpack-web"  # model.json's "format": what --force may replace
_HINT = (
    f"run `npm ci --prefix runtime/web` in a slotpack checkout, or `npm install "
    f"onnxruntime-web@{PINNED}` and pass --ort-web node_modules/onnxruntime-web (or set ${ENV})"
)


class WebAssetsError(SlotpackError):
    """onnxruntime-web's files (from its npm package) are missing or incomplete."""


@dataclass(frozen=True)
class WebExport:
    folder: Path
    onnx_bytes: int
    total_bytes: int
    ort_version: str
    ort_dir: Path  # where onnxruntime-web's dist files were taken from


def _checkout_package() -> Path:
    """Where ``npm ci --prefix runtime/web`` puts the package in a checkout (editable install)."""
    return Path(
        str(resources.files("slotpack.runtime") / "web" / "node_modules" / "onnxruntime-web")
    )


def find_ort_web(path: Path | str | None = None) -> tuple[Path, str]:
    """(dist folder, version) of onnxruntime-web: ``path``, else ``$SLOTPACK_ORT_WEB``, else the
    checkout's ``runtime/web/node_modules``. ``path`` may name the package folder, a
    ``node_modules`` folder holding it, the folder holding that, or the ``dist`` folder itself."""
    if path is None and os.environ.get(ENV):
        path, given = Path(os.environ[ENV]), f"${ENV}"
    elif path is not None:
        path, given = Path(path), "--ort-web"
    else:
        path, given = _checkout_package(), None
    candidates = [path, path / "dist", path / "onnxruntime-web" / "dist"]
    candidates.append(path / "node_modules" / "onnxruntime-web" / "dist")
    for dist in candidates:
        if all((dist / name).is_file() for name in ORT_FILES):
            return dist, _version(dist.parent)
    if given is None:
        raise WebAssetsError(f"onnxruntime-web's files not found; {_HINT}")
    missing = next(n for n in ORT_FILES if not (candidates[1] / n).is_file())
    raise WebAssetsError(
        f"{given} {path}: no onnxruntime-web package there (no dist/{missing}); {_HINT}"
    )


def _version(package: Path) -> str:
    try:
        version = json.loads((package / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
    return version if isinstance(version, str) else "unknown"


def _text(value, default: str) -> str:
    return value if isinstance(value, str) and value else default


def page_config(slot: F.SlotFile, onnx_bytes: int, ort_version: str, source: bytes) -> dict:
    """What ``app.js`` reads from ``model.json``: input, normalisation, class names, provenance."""
    m = slot.manifest
    meta = m["metadata"]
    dataset = meta.get("dataset") if isinstance(meta.get("dataset"), str) else None
    classes = list(class_names(dataset, m["num_classes"]))
    return {
        "format": MARKER,
        "version": 1,
        "onnx": "model.onnx",
        "onnx_bytes": onnx_bytes,
        "model": _text(meta.get("model"), "slotpack model"),
        "dataset": dataset,
        "input_shape": list(slot.input_shape),
        "mean": list(m["input"]["mean"]),
        "std": list(m["input"]["std"]),
        "classes": classes,
        "k": slot.k if slot.k is not None else ",".join(map(str, slot.ks)),
        "slotpack": __version__,
        "onnxruntime_web": ort_version,
        "source_sha256": hashlib.sha256(source).hexdigest(),
    }


def export_web(
    source: Path | str,
    folder: Path | str,
    *,
    ort_web: Path | str | None = None,
    force: bool = False,
) -> WebExport:
    """Write the page folder for the ``.slot`` file ``source`` (see the module docstring)."""
    from slotpack.converters.onnx import MAX_INLINE_BYTES, export_file, initializer_bytes

    folder = Path(folder)
    _check_target(folder, force)  # before any work; checked again when renaming
    dist, version = find_ort_web(ort_web)
    slot = F.read(source)
    if len(slot.input_shape) != 3 or slot.input_shape[0] not in (1, 3):
        raise ConfigError(
            f"{source}: the page takes images [1 or 3, H, W]; this model takes {list(slot.input_shape)}"
        )
    if initializer_bytes(slot, self_decoding=True) > MAX_INLINE_BYTES:
        raise ConfigError(f"{source}: too large for one ONNX file, so for the browser")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name[:200]}.{secrets.token_hex(4)}.slotpack-web.tmp"
    tmp.mkdir()
    try:
        onnx_bytes, _ = export_file(source, tmp / "model.onnx", self_decoding=True)
        (tmp / "ort").mkdir()
        for name in ORT_FILES:
            shutil.copyfile(dist / name, tmp / "ort" / name)
        (tmp / "ort" / "NOTICE.txt").write_text(
            f"onnxruntime-web {version} (https://github.com/microsoft/onnxruntime), MIT License, "
            "Copyright (c) Microsoft Corporation. Copied from its npm package by slotpack.\n"
        )
        page = resources.files("slotpack.runtime") / "web"
        for name in PAGE_FILES:
            (tmp / name).write_bytes((page / name).read_bytes())
        config = page_config(slot, onnx_bytes, version, slot.payload.obj)
        (tmp / "model.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
        total = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        _put_in_place(tmp, folder, force)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return WebExport(folder, onnx_bytes, total, version, dist)


def _is_ours(folder: Path) -> bool:
    try:
        return json.loads((folder / "model.json").read_text()).get("format") == MARKER
    except (OSError, ValueError, AttributeError):
        return False


def _check_target(folder: Path, force: bool) -> None:
    if not os.path.lexists(folder):
        return
    if not folder.is_dir() or folder.is_symlink():
        raise OutputExistsError(f"{folder} exists and is not a folder; choose another --web folder")
    if not any(folder.iterdir()):
        return  # an empty folder: nothing to overwrite
    if not force:
        raise OutputExistsError(f"{folder} exists; pass --force to replace it")
    if not _is_ours(folder):
        raise OutputExistsError(
            f"{folder} is not a page folder slotpack wrote (no model.json of ours); "
            "--force replaces only those: choose another --web folder"
        )


def _put_in_place(tmp: Path, folder: Path, force: bool) -> None:
    """Rename the finished ``tmp`` to ``folder``. rename() replaces only an empty folder, so a
    folder filled meanwhile is never lost; an earlier page is moved aside first (``force``)."""
    _check_target(folder, force)
    old = None
    if os.path.lexists(folder) and any(folder.iterdir()):
        old = folder.parent / f".{folder.name[:200]}.{secrets.token_hex(4)}.slotpack-web.old"
        os.rename(folder, old)
    try:
        os.rename(tmp, folder)
    except OSError as exc:
        if old is not None:
            os.rename(old, folder)  # put the earlier page back
        if exc.errno in (
            errno.ENOTEMPTY,
            errno.EEXIST,
        ):  # ENOTEMPTY / EEXIST: someone filled it meanwhile
            raise OutputExistsError(f"{folder} exists; pass --force to replace it") from None
        raise OSError(exc.errno, exc.strerror, str(folder)) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
