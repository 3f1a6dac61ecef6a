"""``python -m medseg``: the command line (what ``torchrun -m medseg train ...`` starts on each rank)."""

import sys

from medseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
