"""``python -m slimtorch ...``: the ``slimtorch`` command (the entry ``torchrun -m slimtorch``
starts on every rank of a distributed run; a rank exits through
:func:`slimtorch.calibrate.distributed.exit_rank`)."""

from slimtorch.cli.main import run

if __name__ == "__main__":
    run()
