"""``python -m medseg.cli``: the command line, as ``python -m medseg`` and the ``medseg`` script."""

from medseg.cli import console

if __name__ == "__main__":
    console()
