"""The exceptions slotpack raises; the CLI turns each into a one-line message and exit code 2."""


class SlotpackError(ValueError):
    """Base class of every error slotpack raises on bad input or missing resources."""


class ConfigError(SlotpackError):
    """An option or configuration value is out of range or unknown."""


class RegistryError(ConfigError):
    """A name (model, data set, method) is not in its registry; the message lists the valid names."""


class DataError(SlotpackError):
    """A data set is missing, incomplete or does not match what was expected."""


class CheckpointError(SlotpackError):
    """A checkpoint or run folder is missing, unreadable or inconsistent."""


class OutputExistsError(SlotpackError):
    """An output file exists and overwriting it was not asked for (``--force``)."""


class InUseError(SlotpackError):
    """A run folder is being written by another process (it holds the folder's lock)."""


class OutOfMemoryError(SlotpackError):
    """Memory ran out building what a valid input asks for; the message names what and how big."""


def size_text(nbytes: int) -> str:
    """A byte count for messages: ``"1.50 GiB"``, ``"12.0 MiB"``, ``"980 bytes"``."""
    if nbytes >= 1 << 30:
        return f"{nbytes / (1 << 30):.2f} GiB"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes:,} bytes"
