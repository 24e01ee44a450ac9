"""Image files as model input, and class probabilities for them (``slotpack predict``).

pillow decodes PNG, JPEG and the other formats it knows; each image is converted to the model's
channels (grayscale for one, RGB for three) and resized to its height and width, then normalised
with the mean and std the model records, exactly as ``evaluate`` normalises a data set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from slotpack.datafiles import class_names, spec
from slotpack.errors import ConfigError

from .session import (
    InputError,
    ModelFileError,
    input_normalisation,
    normalize,
    predict,
    recorded_dataset,
    signature,
)

_MODES = {1: "L", 3: "RGB"}


@dataclass(frozen=True)
class Prediction:
    """The classes an image most likely shows, most likely first, with their probabilities."""

    image: str
    classes: tuple[int, ...]
    labels: tuple[str, ...]
    probabilities: tuple[float, ...]


def input_shape(sess) -> tuple[int, int, int]:
    """(C, H, W) of the images a model takes: what its input fixes, else its data set's shape."""
    image = signature(sess).image
    if None in image:
        dataset = recorded_dataset(sess)
        if dataset is None:
            raise ModelFileError(
                f"model input has shape {signature(sess).shape_text()} and the model records no "
                f"data set, so the image size is unknown"
            )
        image = tuple(
            d if d is not None else s for d, s in zip(image, spec(dataset).shape, strict=True)
        )
    if image[0] not in _MODES:
        raise ModelFileError(
            f"model takes {image[0]}-channel images; predict reads grayscale (1) or RGB (3)"
        )
    return image  # type: ignore[return-value]


def read_image(path: Path | str, shape: tuple[int, int, int]) -> np.ndarray:
    """uint8 [C, H, W]: the image at ``path`` in the model's channels, resized (bilinear) to its
    height and width when it differs. InputError (one line) if it cannot be decoded."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = shape
    try:
        with Image.open(path) as img:
            img = img.convert(_MODES[c])
            if img.size != (w, h):
                img = img.resize((w, h), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {path}: not an image format pillow knows") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"cannot read image {path}: {exc}") from None
    except OSError as exc:  # missing, unreadable, or truncated image data
        raise InputError(f"cannot read image {path}: {exc.strerror or exc}") from None
    return pixels[None] if c == 1 else pixels.transpose(2, 0, 1)


def classify(sess, images: Sequence[Path | str], top: int = 1) -> list[Prediction]:
    """The ``top`` most likely classes of each image file, by the softmax of the model's logits."""
    if top < 1:
        raise ConfigError(f"--top must be >= 1, got {top}")
    shape = input_shape(sess)
    mean, std = input_normalisation(sess)
    x = np.stack([read_image(p, shape) for p in images])
    logits = predict(sess, normalize(x, mean, std)).astype(np.float64)
    z = np.exp(logits - logits.max(1, keepdims=True))
    probs = z / z.sum(1, keepdims=True)
    names = class_names(recorded_dataset(sess), logits.shape[1])
    out = []
    for path, p in zip(images, probs, strict=True):
        order = np.argsort(-p, kind="stable")[:top]
        out.append(
            Prediction(
                str(path),
                tuple(int(i) for i in order),
                tuple(names[i] for i in order),
                tuple(float(p[i]) for i in order),
            )
        )
    return out
