"""``python -m slimtorch ...``: the ``slimtorch`` command (the entry ``torchrun -m slimtorch``
starts on every rank of a distributed run)."""

import sys

from slimtorch.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
