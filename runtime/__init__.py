"""slotpack.runtime: the torch-free side of slotpack (numpy and the generator's numpy half only).

``rebuild(path)`` turns a ``.slot`` file into dense float32 arrays; a test imports this package
with torch made unimportable.
"""

from .arrays import save_arrays
from .rebuild import rebuild

__all__ = ["rebuild", "save_arrays"]
