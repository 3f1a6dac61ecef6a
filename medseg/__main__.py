"""``python -m medseg``: the command line (what ``torchrun -m medseg train ...`` starts on each rank)."""

from medseg.cli import console

if __name__ == "__main__":
    console()
