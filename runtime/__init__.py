"""slotpack.runtime: the torch-free side of slotpack (numpy, onnxruntime and the generator's numpy half).

``rebuild(path)`` turns a ``.slot`` file into dense float32 arrays; ``session(path)`` gives an
onnxruntime session for a ``.slot`` or ``.onnx`` file. A test imports this package with torch made
unimportable.
"""

from .arrays import save_arrays
from .rebuild import rebuild
from .session import evaluate, predict, session

__all__ = ["evaluate", "predict", "rebuild", "save_arrays", "session"]
