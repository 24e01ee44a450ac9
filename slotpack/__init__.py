"""slotpack: selection-based (slot machine) networks stored as a seed plus log2(K) bits per connection.

Importing ``slotpack`` never imports torch, so the torch-free runtime (``slotpack.runtime``) can
live in the same package; the torch-based names below load on first use.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    InUseError,
    OutputExistsError,
    RegistryError,
    SlotpackError,
)
from .format import SlotFormatError


def _source_checkout_subpackages() -> None:
    """In a source checkout used without installing (``PYTHONPATH=.``), make the top-level folders
    runtime/ and converters/ importable as slotpack.runtime and slotpack.converters, as the
    installed package-dir mapping does; installed copies (wheel or editable) never need this."""
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if not (here / "runtime").exists() and (here.parent / "runtime" / "__init__.py").is_file():
        __path__.append(str(here.parent))


_source_checkout_subpackages()

_LAZY = {
    "rebuild": "slotpack.runtime",
    "pack_checkpoint": "slotpack.train",
    "pack_model": "slotpack.pack",
    "create": "slotpack.models",
    "SlotLinear": "slotpack.layers",
    "SlotConv2d": "slotpack.layers",
    "SlotConv1d": "slotpack.layers",
    "slotify": "slotpack.modules",
    "slot_layers": "slotpack.modules",
    "param_groups": "slotpack.modules",
    "dense_state_dict": "slotpack.modules",
    "selected_indices": "slotpack.modules",
    "slot_layer_info": "slotpack.modules",
    "SlotLayerInfo": "slotpack.modules",
    "save": "slotpack.modelfile",
    "load_state_dict": "slotpack.modelfile",
    "pack_module": "slotpack.modelfile",
    "pack_state_dict": "slotpack.modelfile",
    "export_onnx": "slotpack.onnx_export",
    "TrainConfig": "slotpack.train",
    "evaluate": "slotpack.train",
    "load_model": "slotpack.train",
}

__all__ = [
    "__version__",
    "SlotpackError",
    "ConfigError",
    "RegistryError",
    "DataError",
    "CheckpointError",
    "OutputExistsError",
    "InUseError",
    "SlotFormatError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'slotpack' has no attribute {name!r}")
