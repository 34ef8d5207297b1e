"""``python -m rvsepp`` (and ``torchrun -m rvsepp``): the command line of :mod:`rvsepp.cli`."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
