"""``python -m crux_workers`` is the ``crux-workers`` command."""

from .cli import main

main()
