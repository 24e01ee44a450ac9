"""The checks of the structure-aware fuzzer (benchmarks/fuzz_slot.py): every reader path on
one file, compared with each other and with oracles.

A path passes when it succeeds with a consistent result or refuses the file with
``SlotFormatError`` (``unsupported``: another ``SlotpackError``, for a valid file a path does
not support, such as self-decoding K > 256). Oracles: the generator's own indices, a numpy
forward pass (float64) for onnxruntime's logits, dense against self-decoding logits bit for bit.
"""

from __future__ import annotations

import math
import re
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fuzz_grammar import Case, parse_name
from slotpack import arch as A
from slotpack import format as F
from slotpack import prng
from slotpack.errors import SlotpackError

PATHS = (
    "inspect", "inspect_noverify", "rebuild", "unpack", "pack", "export", "export_self_decoding", "eval",
    "eval_self_decoding",
)  # fmt: skip


class Inconsistent(Exception):
    """A reader path succeeded with a result that disagrees with another path or an oracle."""


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)
    return a.shape == b.shape and bool((a.view(np.uint32) == b.view(np.uint32)).all())


def _windows(x: np.ndarray, k: int, stride: int, pad: int = 0, dil: int = 1) -> np.ndarray:
    """[N, C, OH, OW, k, k] windows of ``x`` with zero padding, without building the padded
    array (a valid file may pad by 2^30 where the stride skips all of it)."""
    taps = []
    for size in x.shape[2:]:
        out = A._window(size, k, stride, pad, dil)
        at = np.arange(out)[:, None] * stride - pad + np.arange(k)[None, :] * dil
        inside = (at >= 0) & (at < size)
        taps.append((np.where(inside, at, 0), inside))
    (rows, row_in), (cols, col_in) = taps
    win = x[:, :, rows][..., cols]  # [N, C, OH, k, OW, k]
    win = win * (row_in[:, :, None, None] & col_in[None, None])
    return win.transpose(0, 1, 2, 4, 3, 5)


def forward(
    layers: tuple[A.Layer, ...], arrays: dict[str, np.ndarray], x: np.ndarray
) -> np.ndarray:
    """The network in plain numpy (float64), torch's semantics: the oracle for onnxruntime."""
    x = x.astype(np.float64)
    for pos, layer in enumerate(layers):
        match layer:
            case A.Conv2d():
                w = arrays[f"{pos}.weight"].astype(np.float64)
                win = _windows(x, layer.kernel_size, layer.stride, layer.padding, layer.dilation)
                g, cg, og = layer.groups, w.shape[1], w.shape[0] // layer.groups
                parts = [
                    np.einsum("nchwij,ocij->nohw", win[:, i * cg : (i + 1) * cg],
                              w[i * og : (i + 1) * og])
                    for i in range(g)
                ]  # fmt: skip
                x = np.concatenate(parts, axis=1)
                if layer.bias:
                    x = x + arrays[f"{pos}.bias"].astype(np.float64)[:, None, None]
            case A.Linear():
                x = x @ arrays[f"{pos}.weight"].astype(np.float64).T
                if layer.bias:
                    x = x + arrays[f"{pos}.bias"]
            case A.BatchNorm2d():
                mean = arrays[f"{pos}.running_mean"].astype(np.float64)[:, None, None]
                var = arrays[f"{pos}.running_var"].astype(np.float64)[:, None, None]
                x = (x - mean) / np.sqrt(var + np.float32(layer.eps))
            case A.ReLU():
                x = np.maximum(x, 0)
            case A.MaxPool2d():
                x = _windows(x, layer.kernel_size, layer.stride).max((-1, -2))
            case A.AvgPool2d():
                x = _windows(x, layer.kernel_size, layer.stride).mean((-1, -2))
            case A.Flatten():
                x = x.reshape(len(x), -1)
    return x


def check_case(case: Case, path: Path, work: Path, *, images: int = 3) -> dict[str, Any]:
    """Run every reader path on the file at ``path`` (the bytes of ``case``): outcomes per path
    ("ok", "refused:<class>", "unsupported:<class>", "failed:<class>", "skipped") and failures.

    Every path reads the file itself; comparisons between paths run where both succeeded."""
    from slotpack import inspect
    from slotpack.converters.onnx import export_file
    from slotpack.pack import repack
    from slotpack.runtime import rebuild, session, unpack
    from slotpack.runtime.rebuild import layout
    from slotpack.runtime.session import evaluate, input_normalisation, normalize, predict

    out: dict[str, str] = {}
    failures: list[dict[str, str]] = []
    notes: Counter = Counter()
    values: dict[str, Any] = {}
    rng = np.random.default_rng(parse_name(case.name))

    def ok(name: str) -> bool:
        return out.get(name) == "ok"

    def attempt(name: str, fn, *needs: str) -> None:
        if not all(ok(n) for n in needs):
            out[name] = "skipped"
            return
        try:
            values[name] = fn()
            out[name] = "ok"
        except F.SlotFormatError as exc:
            out[name], values[name] = f"refused:{type(exc).__name__}", exc
        except SlotpackError as exc:
            out[name], values[name] = f"unsupported:{type(exc).__name__}", exc
        except Exception as exc:  # anything else is what this looks for
            out[name] = f"failed:{type(exc).__name__}"
            failures.append({"path": name, "error": _tail(exc)})

    def summarised(verify: bool):
        slot = F.read(path, verify=verify)
        s = inspect.summary(slot, verified=verify)
        want = sum(math.prod(w.layer.weight_shape) for w in slot.weights)
        if s["total"]["connections"] != want or s["total"]["bytes"] != len(case.data):
            raise Inconsistent(f"summary totals {s['total']} for {want} connections")
        for row in s["layers"]:
            if row["k"] is not None and not 0 <= row["changed"] <= row["connections"]:
                raise Inconsistent(f"layer {row['position']}: {row['changed']} changed")
        return slot

    def rebuilt():
        arrays = rebuild(path)
        if not ok("inspect"):
            return arrays
        slot = values["inspect"]
        if {n: a.shape for n, a in arrays.items()} != layout(slot):
            raise Inconsistent("rebuilt arrays do not match the layout")
        for w in slot.weights:
            weight = arrays[f"{w.position}.weight"]
            if weight.dtype != np.float32 or not (np.abs(weight) <= w.bound).all():
                raise Inconsistent(f"layer {w.position}: weights outside [-bound, bound]")
            if case.indices is not None:
                want = prng.selected_np(slot.seed, w.number, case.indices[w.position], w.k, w.bound)
                if not _same_bits(weight.reshape(-1), want):
                    raise Inconsistent(f"layer {w.position}: not the generator's indices")
                notes["indices_checked"] += 1
        return arrays

    def unpacked():
        target = work / "arrays.npz"
        unpack(path, target, force=True)
        with np.load(target) as npz:
            got = {n: npz[n] for n in npz.files}
        if ok("rebuild"):
            arrays = values["rebuild"]
            if list(got) != list(arrays) or not all(_same_bits(got[n], arrays[n]) for n in arrays):
                raise Inconsistent("unpacked .npz differs from rebuild")

    def repacked():
        data = repack(F.read(path))  # what `slotpack pack x.slot -o y.slot` writes
        if ok("rebuild"):
            again, arrays = rebuild(data), values["rebuild"]
            if list(again) != list(arrays) or not all(
                _same_bits(again[n], arrays[n]) for n in arrays
            ):
                raise Inconsistent("the re-encoded file rebuilds other arrays")

    def exported(self_decoding: bool):
        import onnx

        target = work / ("sd.onnx" if self_decoding else "dense.onnx")
        export_file(path, target, self_decoding=self_decoding, force=True)
        if self_decoding or not ok("rebuild"):
            return target
        arrays, seen = values["rebuild"], Counter()
        for t in onnx.load(target).graph.initializer:
            m = re.fullmatch(r"l(\d+)([wbr])\d+", t.name)
            if not m:
                continue
            pos, role = m.groups()
            if role == "r":
                name = ("running_mean", "running_var")[min(seen[pos + "r"], 1)]
            else:
                name = "weight" if role == "w" else "bias"
            seen[pos + role] += 1
            if not _same_bits(onnx.numpy_helper.to_array(t), arrays[f"{pos}.{name}"]):
                raise Inconsistent(f"dense graph's {t.name} differs from rebuild's {pos}.{name}")
        if sum(seen.values()) != len(arrays):
            raise Inconsistent(f"dense graph holds {sum(seen.values())} of {len(arrays)} arrays")
        return target

    def evaluated():
        sess = session(path, threads=1)  # what `slotpack eval x.slot` runs
        if not ok("inspect"):
            return None  # _agree reports a session made from a file the reader refuses
        slot = values["inspect"]
        mean, std = input_normalisation(sess)
        x = rng.integers(0, 256, (images, *slot.input_shape), dtype=np.uint8)
        y = rng.integers(0, slot.manifest["num_classes"], images)
        result = evaluate(sess, x, y, batch_size=images)
        if result.count != images or not 0 <= result.accuracy <= 1:
            raise Inconsistent(f"evaluate says {result}")
        batch = normalize(x, mean, std)
        logits = predict(sess, batch)
        if ok("export") and not _same_bits(
            logits, predict(session(values["export"], threads=1), batch)
        ):
            raise Inconsistent("the exported .onnx file and the .slot file give other logits")
        if ok("rebuild"):
            with np.errstate(all="ignore"):
                want = forward(slot.layers, values["rebuild"], batch)
            top = float(np.abs(want).max(initial=0)) if np.isfinite(want).all() else math.inf
            if top < 1e6:
                if not np.allclose(logits, want, rtol=1e-3, atol=1e-4 * max(1.0, top)):
                    raise Inconsistent(
                        f"onnxruntime logits differ from numpy by {np.abs(logits - want).max():.3g}"
                    )
                notes["numpy_compared"] += 1
            else:
                notes["numpy_skipped_nonfinite"] += 1
        return batch, logits

    def evaluated_self_decoding():
        batch, logits = values["eval"]
        got = predict(session(values["export_self_decoding"], threads=1), batch)
        if not _same_bits(got, logits):
            with np.errstate(all="ignore"):
                gap = np.nanmax(np.abs(got - logits))
            raise Inconsistent(f"self-decoding logits differ from dense by {gap:.3g}")
        notes["self_decoding_compared"] += 1

    attempt("inspect", lambda: summarised(True))
    attempt("inspect_noverify", lambda: summarised(False))
    attempt("rebuild", rebuilt)
    attempt("unpack", unpacked)
    attempt("pack", repacked)
    attempt("export", lambda: exported(False))
    attempt("export_self_decoding", lambda: exported(True))
    attempt("eval", evaluated)
    if ok("eval") and values["eval"] is not None:
        attempt("eval_self_decoding", evaluated_self_decoding, "export_self_decoding")
    else:
        out["eval_self_decoding"] = "skipped"
    for name in ("rebuild", "unpack", "pack", "export", "export_self_decoding", "eval"):
        _agree(out, name, values, failures)
    first, lax = out["inspect"], out["inspect_noverify"]
    if first.startswith("refused") and lax == "ok" and first != "refused:ChecksumError":
        failures.append(
            {
                "path": "inspect_noverify",
                "error": f"accepted without CRCs a file refused for {values['inspect']}",
            }
        )
    elif first == "ok" and lax != "ok":
        failures.append({"path": "inspect_noverify", "error": "refused a file --verify accepts"})
    if (
        case.expect is not None
        and first != "skipped"
        and (first == "ok") != (case.expect == "valid")
    ):
        failures.append(
            {
                "path": "inspect",
                "error": f"the generator expected a {case.expect} "
                f"file; {first} {values.get('inspect', '')}"[:400],
            }
        )
    return {"paths": out, "failures": failures, "notes": dict(notes)}


def _agree(out: dict, name: str, values: dict, failures: list) -> None:
    """A path that read the file must come to the reader's verdict on it."""
    first, mine = out["inspect"], out[name]
    if first.startswith("refused") and mine == "ok":
        failures.append(
            {"path": name, "error": f"accepted a file inspect refuses: {values['inspect']}"[:400]}
        )
    elif first == "ok" and mine.startswith("refused"):
        failures.append(
            {"path": name, "error": f"refused a file inspect accepts: {values[name]}"[:400]}
        )


def _tail(exc: BaseException) -> str:
    lines = traceback.format_exception(exc)
    return "".join(lines[-6:])[-1500:]


def outcome(result: dict[str, Any]) -> str:
    """A file's outcome: accepted, refused, failed (some path broke its promise)."""
    if result["failures"]:
        return "failed"
    return "accepted" if result["paths"]["inspect"] == "ok" else "refused"


HEAVY = 1 << 23  # generator outputs past which a file "declares much" (about 0.3 s per pass)


def declared_work(data: bytes) -> int | None:
    """Generator outputs a reader spends on the file's indices, from its manifest alone: per
    connection one (rules onedraw, onedraw16) or K (argmax, draw), plus K per changed connection
    of a delta section (its reference order), 2K in the crossing order (values and scores); None
    when the reader refuses the file."""
    try:
        slot = F.decode(data, verify=False)
    except Exception:  # refused, or a reader bug that the checks report
        return None
    work = 0
    for w in slot.weights:
        s = slot.sections[w.section]
        per_change = w.k * (1 if s.crossing is None else 2)
        work += w.count * (1 if w.reference in prng.ONEDRAW else w.k) + s.changes * per_change
    return work
