"""``python -m slotpack`` (and ``torchrun -m slotpack``) runs the CLI."""

from .cli import main

main()
