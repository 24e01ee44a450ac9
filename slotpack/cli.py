"""The ``slotpack`` command: the only place that prints for humans and maps errors to exit codes.

Every SlotpackError becomes one line on stderr and exit code 2 (click's usage-error convention).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__, prng
from .datafiles import AUGMENTS
from .errors import SlotpackError
from .kernels import KERNELS  # imports no torch, like everything at the top of this file

DATA_ROOT = click.option(
    "--root",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data folder (default: $SLOTPACK_DATA, else ./data).",
)
DEVICE = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)


class _OneLineError(click.ClickException):
    """Printed as a single ``Error: ...`` line; exit code 2 like click's usage errors."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        _Bars.close_all()  # the error gets a line of its own, not the end of a progress bar
        super().show(file)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


TRAIN_EXTRA = "pip install 'slotpack[train]'"


class _Group(click.Group):
    """Turns our exceptions (and the OS's) into one-line errors with exit code 2, never tracebacks."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except SlotpackError as exc:
            raise _OneLineError(_first_line(exc)) from None
        except ModuleNotFoundError as exc:  # the runtime-only install: training needs torch
            if (exc.name or "").split(".")[0] not in ("torch", "torchvision"):
                raise
            raise _OneLineError(
                f"`slotpack {ctx.invoked_subcommand}` needs torch, which the runtime-only "
                f"install leaves out: {TRAIN_EXTRA}"
            ) from None
        except OSError as exc:  # disk full, permission denied, ...: the user's to fix
            where = f"{exc.filename}: " if exc.filename else ""
            raise _OneLineError(f"{where}{exc.strerror or _first_line(exc)}") from None
        except MemoryError:  # what our code builds is named by OutOfMemoryError; this is the rest
            raise _OneLineError(
                f"out of memory running `slotpack {ctx.invoked_subcommand}`"
            ) from None
        except KeyboardInterrupt:
            _Bars.close_all()
            click.echo("interrupted", err=True)
            sys.exit(130)


class _Bars:
    """A tqdm bar per epoch with loss and accuracy (the train.Reporter protocol)."""

    _open: list[Any] = []  # bars an error may interrupt; closed before it is printed

    def __init__(self) -> None:
        self.bar = None

    @classmethod
    def close_all(cls) -> None:
        while cls._open:
            cls._open.pop().close()

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(
            total=steps,
            desc=f"epoch {epoch + 1}/{epochs}",
            unit="step",
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self._open.append(self.bar)

    def step(self) -> None:
        self.bar.update()

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.bar.set_postfix(
            loss=f"{record['train_loss']:.4f}",
            acc=f"{record['train_acc']:.4f}",
            val=f"{record['val_acc']:.4f}",
            s=f"{record['epoch_seconds']:.1f}",
        )
        self.bar.close()
        self._open.remove(self.bar)


def _per_layer(value: str, kind: type, hint: str) -> tuple:
    """One number, or one per weighted layer (comma-separated): ``--k 2,8,8``, ``--rate 1,0,0``."""
    try:
        values = tuple(kind(v) for v in str(value).split(","))
    except ValueError:
        values = ()
    if not values or not all(0 <= v < float("inf") for v in values):
        raise click.BadParameter(
            f"not a number >= 0 or a comma-separated list of them: {value!r}", param_hint=hint
        )
    return values


def _explicit(*names: str) -> list[str]:
    """The options among ``names`` that the user gave (not their defaults), as ``--name``."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    given = [n for n in names if ctx.get_parameter_source(n) not in (None, ParameterSource.DEFAULT)]
    return ["--" + n.replace("_", "-") for n in given]


DATASET_NAMES = {"mnist": "MNIST", "cifar10": "CIFAR-10"}


def _root(root: Path | None) -> Path:
    from .datafiles import default_root

    return root if root is not None else default_root()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="slotpack")
def main() -> None:
    """Train slot-machine networks and pack them into seed + log2(K) bits per connection."""


@main.command("data")
@click.argument("name", type=click.Choice(["mnist", "cifar10"]))
@DATA_ROOT
def data_cmd(name: str, root: Path | None) -> None:
    """Fetch a data set into torchvision's layout under --root."""
    from . import data

    where = data.fetch(name, _root(root), progress=lambda msg: click.echo(msg, err=True))
    click.echo(f"{name} ready under {where}")


@main.command("train")
@click.option(
    "--model",
    required=True,
    help="Zoo name: lenet300100, conv2, conv4, conv6, vgg19, resnet20, resnet18.",
)
@click.option(
    "--dataset",
    type=click.Choice(["mnist", "cifar10"]),
    default=None,
    help="Data set (default: the model's own; Lenet-300-100 is MNIST's, the others CIFAR-10's).",
)
@click.option(
    "--method",
    type=click.Choice(["slot", "learned"]),
    default="slot",
    show_default=True,
    help="slot: learn which of K random values each connection uses; learned: the float32 twin "
    "(ordinary weights, no K or selection).",
)
@click.option(
    "--k",
    "k",
    default="8",
    show_default=True,
    callback=lambda ctx, param, value: _per_layer(value, int, "--k"),
    help="Values per connection (slot models): one K, or one per weighted layer (for example "
    "2,8,8).",
)
@click.option(
    "--selection",
    type=click.Choice(["greedy", "probabilistic"]),
    default="greedy",
    show_default=True,
    help="How a slot layer picks its value: the highest score, or a draw from their softmax.",
)
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True)
@click.option(
    "--rate",
    default="0",
    show_default=True,
    callback=lambda ctx, param, value: _per_layer(value, float, "--rate"),
    help="Rate-aware training: leaving a connection's initial slot costs this margin (in units "
    "of the layer's bound), so fewer connections change and the .slot file is smaller. One "
    "value, or one per weighted layer (for example 0.5,0,0).",
)
@click.option(
    "--init",
    type=click.Choice(prng.INITS),
    default=prng.DEFAULT_INIT,
    show_default=True,
    help="Initial scores: onedraw16 draws the top slot first and orders the others from 16-bit "
    "draws, so a reader regenerates both cheaply (onedraw: the same top slot, the order from K "
    "draws); uniform is how runs before format version 2 were initialised.",
)
@click.option(
    "--augment",
    type=click.Choice(AUGMENTS),
    default=None,
    help="Training augmentation: shift (random shifts of up to 2 pixels, for digits), crop-flip "
    "(random crop with padding 4 and horizontal flip) or none. Default: crop-flip for cifar10, "
    "none for mnist.",
)
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=None, help="Default: the reference code's per model.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option(
    "--weight-decay", type=float, default=None, help="Default: 0, and 1e-4 for vgg19 (reference)."
)
@click.option(
    "--schedule",
    type=click.Choice(["constant", "cosine", "step"]),
    default=None,
    help="Learning-rate schedule. Default: constant, and step (x0.1 at epoch 80) for vgg19.",
)
@click.option(
    "--milestones", default=None, help="Comma-separated epochs for --schedule step (default 80)."
)
@click.option("--limit", type=int, default=None, help="Use only the first N training examples.")
@click.option(
    "--eval-limit", type=int, default=None, help="Use only the first N val/test examples."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The run folder (created, with missing parent folders).",
)
@click.option("--resume", is_flag=True, help="Continue the run in --out from last.pt.")
@click.option(
    "--lean",
    is_flag=True,
    help="Keep no value bank in memory: regenerate values (same results, less memory).",
)
@click.option(
    "--score-dtype",
    type=click.Choice(["float32", "bfloat16"]),
    default="float32",
    show_default=True,
    help="Dtype of the scores, their gradient and momentum (bfloat16 halves that memory).",
)
@click.option(
    "--step-in-backward",
    is_flag=True,
    help="Apply SGD to each layer inside the backward pass (same results, less memory).",
)
@click.option(
    "--compile", "compile_", is_flag=True, help="Run training steps through torch.compile."
)
@click.option(
    "--kernel",
    type=click.Choice(KERNELS),
    default="auto",
    show_default=True,
    help="What --lean layers run: fused Triton kernels (CUDA) or plain torch; auto picks Triton "
    "where it runs and matches torch bit for bit. Results are identical.",
)
@click.option(
    "--distributed",
    is_flag=True,
    help="Data-parallel over the ranks of a torchrun job (automatic under torchrun).",
)
@click.option(
    "--grad-reduce",
    type=click.Choice(["scores", "weights"]),
    default="scores",
    show_default=True,
    help="Data-parallel: all-reduce the score gradients (DDP), or each slot layer's weight "
    "gradient, K times smaller, before the score gradient is formed.",
)
@DATA_ROOT
@DEVICE
def train_cmd(
    out: Path,
    resume: bool,
    root: Path | None,
    device: str,
    milestones: str | None,
    distributed: bool,
    grad_reduce: str,
    compile_: bool,
    kernel: str,
    **options: Any,
) -> None:
    """Train a zoo model (slot network, or --method learned for the float32 baseline).

    Under `torchrun --nproc-per-node N -m slotpack train ...` every rank trains its shard of
    each batch (--batch-size is the global batch) and rank 0 writes the run folder."""
    from .distributed import launched
    from .errors import ConfigError
    from .train import TrainConfig, train

    if options["method"] != "slot":
        given = _explicit("k", "selection", "init", "lean")
        if given:
            raise ConfigError(
                f"{', '.join(given)}: only slot models have slots; --method learned trains a "
                "float32 model (drop these options)"
            )
    if milestones is not None:
        try:
            options["milestones"] = tuple(int(m) for m in milestones.split(",") if m.strip())
        except ValueError:
            raise click.BadParameter(
                f"not a comma-separated list of epochs: {milestones!r}", param_hint="--milestones"
            ) from None
    ks = options.pop("k")
    options["k"], options["layer_k"] = max(ks), (ks if len(ks) > 1 else None)
    rates = options.pop("rate")
    options["rate"], options["layer_rate"] = max(rates), (rates if len(rates) > 1 else None)
    cfg = TrainConfig(**options)
    distributed = distributed or launched()
    result = train(
        cfg,
        out,
        root=_root(root),
        device=device,
        resume=resume,
        reporter=_Bars(),
        distributed=distributed,
        compile=compile_,
        grad_reduce=grad_reduce,
        kernel=kernel,
    )
    if int(os.environ.get("RANK", "0")) == 0:
        ranks = f" ({result['world_size']} ranks)" if "world_size" in result else ""
        click.echo(
            f"best val acc {result['val_acc']:.4f} (epoch {result['best_epoch']}), "
            f"test acc {result['test_acc']:.4f}{ranks} -> {out}"
        )


@main.command("finetune")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--epochs", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=None, help="Default: the learned baseline's 0.01.")
@click.option(
    "--schedule",
    type=click.Choice(["constant", "cosine", "step"]),
    default=None,
    help="Learning-rate schedule. Default: constant, and step (x0.1 at epoch 80) for vgg19.",
)
@click.option("--limit", type=int, default=None, help="Use only the first N training examples.")
@click.option(
    "--eval-limit", type=int, default=None, help="Use only the first N val/test examples."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="The new run folder (created, with missing parent folders).",
)
@click.option("--resume", is_flag=True, help="Continue the finetuning in --out from last.pt.")
@DATA_ROOT
@DEVICE
def finetune_cmd(
    run: Path, out: Path, resume: bool, root: Path | None, device: str, **options: Any
) -> None:
    """Turn a slot run into a dense float32 model from its selected weights and train it further."""
    from .errors import ConfigError
    from .train import finetune_config, train

    source = run if run.is_dir() else run.parent
    if out.exists() and source.exists() and os.path.samefile(out, source):
        raise ConfigError(f"--out {out} is the run being finetuned; choose a new folder")
    cfg = finetune_config(run, **options)
    result = train(cfg, out, root=_root(root), device=device, resume=resume, reporter=_Bars())
    click.echo(
        f"finetuned: best val acc {result['val_acc']:.4f}, test acc {result['test_acc']:.4f} -> {out}"
    )


@main.command("eval")
@click.argument("target", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
@click.option("--split", type=click.Choice(["test", "val"]), default="test", show_default=True)
@click.option(
    "--dataset",
    type=click.Choice(["mnist", "cifar10"]),
    default=None,
    help="The data set (default: the one the run or file records; a model is evaluated only "
    "on its own; needed for foreign .onnx files that record none).",
)
@click.option("--limit", type=int, default=None, help="Use only the first N examples.")
@click.option(
    "--batch-size",
    type=click.IntRange(1),
    default=256,
    show_default=True,
    help="Images per batch (torch and onnxruntime).",
)
@DATA_ROOT
@DEVICE
def eval_cmd(
    target: Path,
    as_json: bool,
    split: str,
    dataset: str | None,
    limit: int | None,
    batch_size: int,
    root: Path | None,
    device: str,
) -> None:
    """Accuracy of a run folder or checkpoint (torch), or of a .slot/.onnx file (onnxruntime)."""
    from .errors import ConfigError

    if target.suffix in (".slot", ".onnx"):
        if _explicit("device"):
            raise ConfigError(
                f"--device applies to run folders and checkpoints (torch); {target.name} runs in "
                "onnxruntime on the CPU"
            )
        record = _eval_ort(target, dataset, split, limit, batch_size, _root(root))
    else:
        from . import data
        from .train import evaluate, load_model, resolve_device

        dev = resolve_device(device)
        model, cfg = load_model(target, dev)
        trained_on = cfg.resolved().dataset
        if dataset is not None and dataset != trained_on:
            raise ConfigError(
                f"{target} is a {cfg.model} run on {DATASET_NAMES[trained_on]}; it cannot be "
                f"evaluated on {DATASET_NAMES[dataset]} (omit --dataset)"
            )
        test = data.load(trained_on, _root(root), split, dev, limit=limit)
        result = evaluate(model, test, batch_size=batch_size)
        record = {
            "target": str(target),
            "engine": "torch",
            "model": cfg.model,
            "dataset": trained_on,
            "method": cfg.method,
            **({"k": cfg.layer_k or cfg.k} if cfg.method == "slot" else {}),
            "split": split,
            "accuracy": result.accuracy,
            "loss": result.loss,
            "count": result.count,
            "seconds": result.seconds,
        }
    if as_json:
        click.echo(json.dumps(record, sort_keys=True))
    elif record["engine"] == "torch":
        kind = f"K={record['k']}" if "k" in record else "float32"
        click.echo(
            f"{record['model']} ({record['method']}, {kind}) {split} accuracy "
            f"{record['accuracy']:.4f} on {record['count']} images, loss {record['loss']:.4f}"
        )
    else:
        click.echo(
            f"{target.name} (onnxruntime) {split} accuracy {record['accuracy']:.4f} on "
            f"{record['count']} images; {record['images_per_second']:,.0f} images/s; batch "
            f"{record['batch_size']} latency p50 {record['latency_ms_p50']:.2f} ms, p90 "
            f"{record['latency_ms_p90']:.2f} ms, p99 {record['latency_ms_p99']:.2f} ms"
        )


def _eval_ort(
    target: Path, dataset: str | None, split: str, limit: int | None, batch_size: int, root: Path
) -> dict[str, Any]:
    from dataclasses import asdict

    from tqdm import tqdm

    from .datafiles import load_arrays, spec
    from .errors import ConfigError
    from .runtime import evaluate, session
    from .runtime.session import input_normalisation, recorded_dataset, signature

    sess = session(target)
    try:  # a foreign model's interface, before any data is loaded
        sig = signature(sess)
        input_normalisation(sess)
    except SlotpackError as exc:
        raise type(exc)(f"{target}: {exc}") from None
    try:
        recorded = recorded_dataset(sess)
    except SlotpackError as exc:  # unreadable metadata only matters when --dataset is missing
        if dataset is None:
            raise type(exc)(f"{target}: {exc}") from None
        recorded = None
    if dataset is None:
        dataset = recorded
    if dataset is None:
        raise ConfigError(f"{target} does not record its data set; pass --dataset")
    name = DATASET_NAMES.get(dataset, dataset)
    if recorded in DATASET_NAMES and recorded != dataset:
        raise ConfigError(
            f"{target} is a {DATASET_NAMES[recorded]} model (it expects {DATASET_NAMES[recorded]}"
            f"-shaped input {sig.shape_text()}); it cannot be evaluated on {name} (omit --dataset)"
        )
    shape = spec(dataset).shape
    if not sig.fits(shape):
        fitting = [n for n in DATASET_NAMES if sig.fits(spec(n).shape)]
        expects = f"input {sig.shape_text()}"
        if fitting:
            expects = f"{DATASET_NAMES[fitting[0]]}-shaped {expects}"
        raise ConfigError(
            f"{target} expects {expects}, but {name} images are [N, {', '.join(map(str, shape))}]"
            + (f"; pass --dataset {fitting[0]}" if fitting else "")
        )
    x, y, _ = load_arrays(dataset, root, split, limit)
    with tqdm(
        total=len(y),
        desc=f"onnxruntime {split}",
        unit="img",
        file=sys.stderr,
        disable=len(y) < 2000,
    ) as bar:
        result = evaluate(sess, x, y, batch_size=batch_size, progress=bar.update)
    return {
        "target": str(target),
        "engine": "onnxruntime",
        "dataset": dataset,
        "split": split,
        **asdict(result),
    }


@main.command("predict")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("images", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--top", type=click.IntRange(1), default=1, show_default=True, help="Classes per image."
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON record.")
def predict_cmd(model: Path, images: tuple[Path, ...], top: int, as_json: bool) -> None:
    """Class and probability of image files (PNG, JPEG, ...) under a .slot or .onnx model, in
    onnxruntime; images are converted and resized to the model's input (no torch)."""
    from .errors import ConfigError
    from .runtime import classify, session
    from .runtime.session import ModelFileError, recorded_dataset

    if model.suffix not in (".slot", ".onnx"):
        raise ConfigError(f"{model}: predict takes a .slot or .onnx model file")
    sess = session(model)
    try:
        predictions = classify(sess, images, top=top)
    except ModelFileError as exc:  # image errors name their file already
        raise ModelFileError(f"{model}: {exc}") from None
    if as_json:
        record = {
            "model": str(model),
            "engine": "onnxruntime",
            "dataset": recorded_dataset(sess),
            "predictions": [
                {
                    "image": p.image,
                    "class": p.classes[0],
                    "label": p.labels[0],
                    "probability": p.probabilities[0],
                    "top": [
                        {"class": c, "label": name, "probability": prob}
                        for c, name, prob in zip(p.classes, p.labels, p.probabilities, strict=True)
                    ],
                }
                for p in predictions
            ],
        }
        click.echo(json.dumps(record, sort_keys=True))
        return
    for p in predictions:
        ranked = ", ".join(
            f"{name} ({prob:.4f})" for name, prob in zip(p.labels, p.probabilities, strict=True)
        )
        click.echo(f"{p.image}: {ranked}")


@main.command("export")
@click.argument("path", type=click.Path(path_type=Path))
@click.option(
    "-o", "--output", type=click.Path(), help="The .onnx file to write (its folder must exist)."
)
@click.option(
    "--self-decoding",
    is_flag=True,
    help="Ship seed + packed indices; the graph regenerates the weights when loaded.",
)
@click.option(
    "--web",
    type=click.Path(file_okay=False, path_type=Path),
    help="Instead of -o: write a static page folder that runs the self-decoding model in the "
    "browser (onnxruntime-web, wasm).",
)
@click.option(
    "--ort-web",
    type=click.Path(path_type=Path),
    help="With --web: the onnxruntime-web npm package folder (default: $SLOTPACK_ORT_WEB, "
    "else runtime/web/node_modules after `npm ci --prefix runtime/web`).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file (or page folder).")
def export_cmd(
    path: Path,
    output: str | None,
    self_decoding: bool,
    web: Path | None,
    ort_web: Path | None,
    force: bool,
) -> None:
    """Export a .slot file to ONNX (dense float32 weights, or --self-decoding), or a --web page;
    or a float32 run (--method learned, or finetuned: its folder or a checkpoint) to dense ONNX;
    or a resnet20/resnet18 run (folder or checkpoint), dense or --self-decoding."""
    from .atomic import check_output
    from .errors import ConfigError

    if (output is None) == (web is None):
        raise ConfigError("export needs one of -o FILE and --web DIR")
    if ort_web is not None and web is None:
        raise ConfigError("--ort-web goes with --web DIR")
    if web is not None:
        _export_web(path, web, ort_web, force)
        return
    if _is_checkpoint(path):
        from .pipeline import export_checkpoint

        checkpoint = path / "best.pt" if path.is_dir() else path
        out = check_output(
            output, inputs=(checkpoint,), force=force, suffix=".onnx", stem=path.resolve().stem
        )
        if _module_run(checkpoint):  # any-model runs (resnets): export_onnx, either kind
            _export_run(path, out, self_decoding, force)
            return
        if self_decoding:
            raise ConfigError(
                f"--self-decoding exports .slot files; {path} is a checkpoint (a float32 model "
                "has no seed and indices to decode; drop --self-decoding)"
            )
        size = export_checkpoint(path, out, force=force)
        click.echo(f"{out}: {size:,} bytes (dense float32, from {checkpoint})")
        return
    from .converters.onnx import data_path, export_file

    output = check_output(output, inputs=(path,), force=force, suffix=".onnx")
    size, slot_size = export_file(path, output, self_decoding=self_decoding, force=force)
    kind = "self-decoding" if self_decoding else "dense float32"
    if size != output.stat().st_size:  # over protobuf's 2 GiB: the tensors are external data
        kind += f", tensors in {data_path(output).name}"
    line = f"{output}: {size:,} bytes ({kind}), {size / slot_size:.3f}x the .slot file"
    if self_decoding:  # the graph needs random access, so delta-coded indices are expanded
        from . import format as F
        from .pack import repack

        fixed = len(repack(F.read(path), index_encoding="bits"))
        line += f" (fixed-width indices: {size / fixed:.3f}x the bits-encoded .slot)"
    click.echo(line)


def _export_run(run: Path, output: Path, self_decoding: bool, force: bool) -> None:
    from .errors import OutputExistsError
    from .onnx_export import export_run

    if output.exists() and not force:  # before building the model; again when writing
        raise OutputExistsError(f"{output} exists; pass --force to overwrite it")
    export_run(run, output, self_decoding=self_decoding, force=force)
    kind = "self-decoding" if self_decoding else "dense float32"
    click.echo(f"{output}: {output.stat().st_size:,} bytes ({kind})")


def _module_run(checkpoint: Path) -> bool:
    """Whether a checkpoint holds a module-zoo model (resnet20, resnet18) rather than a layer list."""
    from . import arch as A
    from .checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)["config"].get("model") in A.MODULE_ZOO


def _export_web(path: Path, folder: Path, ort_web: Path | None, force: bool) -> None:
    from .converters.web import PINNED, export_web

    done = export_web(path, folder, ort_web=ort_web, force=force)
    tested = "" if done.ort_version == PINNED else f", tested with {PINNED}"
    click.echo(
        f"{folder}/: self-decoding model.onnx {done.onnx_bytes:,} bytes, onnxruntime-web "
        f"{done.ort_version} (wasm{tested}), {done.total_bytes:,} bytes in all"
    )
    click.echo(f"serve it with: python -m http.server -d {folder} 8000  (then open localhost:8000)")


def _is_checkpoint(path: Path) -> bool:
    """A run folder, or a file that is a torch checkpoint (a zip archive) rather than a .slot."""
    if path.is_dir():
        return True
    if path.suffix == ".pt":
        return True
    if not path.is_file():  # never open a FIFO or device to sniff it: it may block forever
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PK\x03\x04"
    except OSError:
        return False


@main.command("pack")
@click.argument("source", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    required=True,
    help="The .slot file to write (its folder must exist).",
)
@click.option(
    "--encoding",
    "index_encoding",
    type=click.Choice(["auto", "bits", "delta", "fast"]),
    default="auto",
    show_default=True,
    help="How indices are stored: delta (only the connections training moved off their "
    "seeded initial slot), bits (fixed width, random access), auto (the smaller per layer), "
    "fast (as auto, but ranking changed slots by initial score only: about 14% larger, "
    "rebuilt about 1.5x faster when 15% of connections changed).",
)
@click.option(
    "--float16", "half", is_flag=True, help="Store dense tensors (BatchNorm, biases) as float16."
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def pack_cmd(source: Path, output: str, index_encoding: str, half: bool, force: bool) -> None:
    """Pack a run folder (its best checkpoint), a checkpoint file, or the state_dict of a
    slotified model (torch.save(slot.state_dict(), "checkpoint.pt"): a weights-only file) into a
    .slot file, or re-encode an existing .slot file (version 1 or 2) losslessly."""
    from .atomic import check_output, write_bytes

    read = source / "best.pt" if source.is_dir() else source  # before the work, and again
    output = check_output(  # when writing
        output, inputs=(read,), force=force, suffix=".slot", stem=source.resolve().stem
    )
    if source.is_file() and _is_slot(source):
        from . import format as F
        from .pack import PackInfo, repack

        slot = F.read(source)
        blob = repack(slot, index_encoding=index_encoding, encoding="float16" if half else None)
        dense = sum(s.count for s in slot.sections.values() if s.encoding.startswith("float"))
        info = PackInfo(len(blob), sum(w.count for w in slot.weights), dense)
        before = f" (was {slot.size:,} bytes, format version {slot.version})"
    else:
        from .checkpoint import pack_checkpoint

        blob, info = pack_checkpoint(
            source, encoding="float16" if half else "float32", index_encoding=index_encoding
        )
        before = ""
    write_bytes(output, blob, force=force)
    click.echo(
        f"{output}: {info.size:,} bytes, {info.bits_per_connection:.3f} bits per connection, "
        f"{info.ratio:.2f}x smaller than float32 ({info.float32_size:,} bytes){before}"
    )


def _is_slot(path: Path) -> bool:
    from .format import MAGIC

    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


@main.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the table as JSON.")
@click.option("--verify", is_flag=True, help="Also re-check every section's CRC-32.")
def inspect_cmd(path: Path, as_json: bool, verify: bool) -> None:
    """Per-layer table of a .slot file: shapes, K, index encoding, connections changed from
    their initial slot, bits per connection, bytes and ratio against float32."""
    from . import format as F
    from .inspect import summary

    report = summary(F.read(path, verify=verify), verified=verify)
    if as_json:
        click.echo(json.dumps(report, sort_keys=True))
        return
    head = (
        f"{'layer':>5s} {'op':10s} {'shape':18s} {'K':>5s} {'indices':>10s} {'changed':>8s} "
        f"{'bits/conn':>9s} {'bytes':>10s} {'vs fp32':>8s}"
    )
    click.echo(head)
    click.echo("-" * len(head))
    for r in report["layers"]:
        weighted = r["k"] is not None
        k = str(r["k"]) if weighted else ""
        enc = r["encoding"] if weighted else ""
        if r.get("gap_code") == "expgolomb":  # gaps Exp-Golomb-coded rather than Rice
            enc += "-eg"
        if r.get("crossing") is not None:  # ranks in the crossing order (FORMAT §1.8)
            enc += "-x"
        changed = f"{100 * r['changed_fraction']:7.2f}%" if weighted else ""
        bpc = f"{r['bits_per_connection']:9.3f}" if weighted else ""
        click.echo(
            f"{r['position']:5d} {r.get('name', r['op']):10s} {'x'.join(map(str, r['shape'])):18s} {k:>5s} "
            f"{enc:>10s} {changed:>8s} {bpc:>9s} {r['bytes']:10,d} {r['ratio']:7.2f}x"
        )
    t = report["total"]
    click.echo("-" * len(head))
    click.echo(
        f"file {t['bytes']:,} bytes (header and manifest {t['overhead_bytes']:,}), "
        f"{t['connections']:,} connections ({t['changed']:,} changed), "
        f"{t['bits_per_connection']:.3f} bits per connection, "
        f"{t['ratio']:.2f}x smaller than float32 ({t['float32_bytes']:,} bytes)"
    )
    ks = str(report["k"]) if report["k"] else "per layer"
    click.echo(
        f"format version {report['format_version']}, generator {report['generator']} seed "
        f"{report['seed']}, K={ks}, selection {report['selection']}; checksums "
        f"{'verified' if verify else 'not verified (--verify)'}"
    )


@main.command("unpack")
@click.argument("path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    required=True,
    help="A .safetensors or .npz file (its folder must exist).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def unpack_cmd(path: Path, output: str, force: bool) -> None:
    """Rebuild the dense float32 weights of a .slot file into .safetensors or .npz (no torch)."""
    import math

    from .atomic import check_output
    from .runtime import unpack

    output = check_output(output, inputs=(path,), force=force, suffix=".safetensors")

    shapes = unpack(path, output, force=force)  # streamed: one array in memory at a time
    total = sum(math.prod(shape) for shape in shapes.values())
    click.echo(f"{output}: {len(shapes)} arrays, {total:,} float32 values")


@main.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Folder for the demo's files (created, with missing parents). A rerun into a folder "
    "the demo created replaces its earlier files.",
)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--k", "k", type=int, default=8, show_default=True)
@click.option("--limit", type=int, default=None, help="Use only the first N training examples.")
@click.option(
    "--force",
    is_flag=True,
    help="Replace an earlier demo's files in an --out the demo did not create (nothing else).",
)
@DATA_ROOT
@DEVICE
def demo_cmd(
    out: Path, epochs: int, k: int, limit: int | None, force: bool, root: Path | None, device: str
) -> None:
    """The main job on its small default: train, pack, export, run in onnxruntime, compare."""
    from .pipeline import demo

    rows = demo(
        out,
        root=_root(root),
        k=k,
        epochs=epochs,
        limit=limit,
        device=device,
        force=force,
        reporter=_Bars(),
        progress=lambda msg: click.echo(msg, err=True),
    )
    head = (
        f"{'artefact':32s} {'bytes':>11s} {'smaller than fp32':>17s} {'torch acc':>9s} "
        f"{'onnxruntime':>11s}"
    )
    click.echo(head)
    click.echo("-" * len(head))
    for r in rows:
        torch_acc = f"{100 * r.torch_acc:8.2f}%" if r.torch_acc is not None else f"{'':9s}"
        click.echo(
            f"{r.artefact:32s} {r.bytes:11,d} {r.ratio:16.2f}x {torch_acc} {100 * r.ort_acc:10.2f}%"
        )
    plural = "epoch" if epochs == 1 else "epochs"
    trained = f"the first {limit:,} training images" if limit else "51,000 training images"
    click.echo(
        f"files under {out}/ (Lenet-300-100 on MNIST, {epochs} {plural} on {trained}; "
        "accuracy on the 10,000 test images)"
    )
