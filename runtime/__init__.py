"""slotpack.runtime: the torch-free side of slotpack (numpy, onnxruntime and the generator's numpy half).

``rebuild(path)`` turns a ``.slot`` file into dense float32 arrays (``iter_arrays`` one at a time,
``unpack`` streams them into a ``.npz``/``.safetensors`` file); ``session(path)`` gives an
onnxruntime session for a ``.slot`` or ``.onnx`` file; ``classify(session, images)`` the most likely
classes of image files. A test imports this package with torch made unimportable.
"""

from .arrays import save_arrays, unpack
from .images import classify
from .rebuild import iter_arrays, load_state_dict, rebuild
from .session import evaluate, predict, session

__all__ = [
    "classify",
    "evaluate",
    "iter_arrays",
    "load_state_dict",
    "predict",
    "rebuild",
    "save_arrays",
    "session",
    "unpack",
]
