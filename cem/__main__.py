"""``python -m cem``: the ``cem`` command, for environments whose scripts folder is not on the PATH."""

from cem.cli import main

main()
