"""Flags several commands share, and the Context they build from them."""

from __future__ import annotations

import argparse

from slimtorch.core.context import Context


def add_common(p: argparse.ArgumentParser) -> None:
    """``--json``, ``--seed``, ``--quiet`` and ``--device``."""
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "--device",
        default="cpu",
        help="where calibration, training and the layer-wise maths run: cpu (default), cuda,"
        " cuda:N or auto (CUDA when a GPU is visible)",
    )


def context(args: argparse.Namespace) -> Context:
    """The run's Context: its seed, its device (checked: a missing GPU exits 2 with what to
    do), and progress bars unless ``--quiet`` or ``--json``."""
    device = str(getattr(args, "device", "cpu"))
    return Context(seed=args.seed, device=device, progress=not args.quiet and not args.json)


def add_trust(p: argparse.ArgumentParser, model: bool = True) -> None:
    """``--model`` and ``--trust-factory``: how an artifact of a Python factory loads."""
    if model:
        p.add_argument(
            "--model",
            help="the model the artifact was made from (pkg.mod:factory, builtin:NAME or a HF"
            " directory): rebuilds an artifact of a Python factory without running the code"
            " its manifest names",
        )
    p.add_argument(
        "--trust-factory",
        action="store_true",
        help="let an artifact of a Python factory import and call the factory its manifest"
        " names (only for artifacts you trust)",
    )
