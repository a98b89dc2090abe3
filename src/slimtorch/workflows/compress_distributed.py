"""``slimtorch compress`` on several processes (docs/distributed.md).

:func:`as_rank` runs one rank's part of a ``torchrun`` job: it joins the process group, runs the
compression (:func:`slimtorch.workflows.compress.compress_to_dir`: rank 0 alone evaluates and
writes the artifact) and turns a failure into one message. :func:`launch` is
``compress --nproc N``: it starts ``python -m torch.distributed.run --standalone`` on this
machine with the same arguments, keeps the launcher's own output in a log, and returns rank 0's
report, or raises one :class:`DistributedError` naming the rank that failed first and why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from slimtorch.calibrate import distributed
from slimtorch.calibrate.distributed import DistributedError, PeerLostError
from slimtorch.core.errors import ConfigError, UserInputError
from slimtorch.formats.atomic import temp_siblings
from slimtorch.recipe import load_recipe
from slimtorch.workflows.compress import CompressOptions, check_distributable

RESULT_ENV = "SLIMTORCH_DIST_RESULT"  # where rank 0 writes its report (for the launcher)
ERRORS_ENV = "SLIMTORCH_DIST_ERRORS"  # where a failing rank writes its message


def end_process(code: int) -> NoReturn:
    """Exit with ``code``; a torchrun rank through :func:`distributed.exit_rank` (no native
    teardown: finished ranks aborted at exit now and then)."""
    if distributed.launched():
        distributed.exit_rank(code)
    sys.exit(code)


def without_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out: list[str] = []
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word == "--nproc":
            skip = True
        elif not word.startswith("--nproc="):
            out.append(word)
    return out


def _record(rank: int, message: str, kind: str) -> None:
    where = os.environ.get(ERRORS_ENV)
    if where:
        text = json.dumps({"rank": rank, "message": message, "kind": kind, "at": time.time()})
        Path(where, f"rank{rank}.json").write_text(text)


def as_rank(run: Callable[[], dict[str, Any]], device: str) -> dict[str, Any]:
    """One rank of a torchrun job: ``run()`` inside the process group."""
    comm = distributed.init_from_env(device)
    where = f"rank {comm.rank} of {comm.world}"
    try:
        report = run()
    except PeerLostError as exc:
        _record(comm.rank, str(exc), "peer")
        raise DistributedError(f"{where}: {exc}", exit_code=1) from exc
    except UserInputError as exc:
        _record(comm.rank, str(exc), "input")
        raise DistributedError(f"{where}: {exc}", exit_code=2) from exc
    except Exception as exc:
        _record(comm.rank, f"{type(exc).__name__}: {exc}", "internal")
        raise
    finally:
        distributed.shutdown()
    result = os.environ.get(RESULT_ENV)
    if result and comm.rank == 0:
        Path(result).write_text(json.dumps(report, default=str))
    return report


def launch(
    argv: Sequence[str], nproc: int, out: str | Path, recipe: Any, options: CompressOptions
) -> dict[str, Any]:
    """Run ``slimtorch <argv>`` on ``nproc`` local processes under torchrun; rank 0's report.
    What every rank would refuse (``check_distributable``) is refused before any starts."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: give 1 or more processes")
    if distributed.launched():
        raise ConfigError("--nproc starts torchrun itself; under torchrun leave it out")
    check_distributable(load_recipe(recipe), options)
    if Path(out).exists() and not options.force:
        raise ConfigError(f"output directory {out} exists; pass --force to replace it")
    with tempfile.TemporaryDirectory(prefix="slimtorch-dist-") as tmp:
        env = {**os.environ, RESULT_ENV: str(Path(tmp, "result.json")), ERRORS_ENV: tmp}
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "slimtorch", *without_nproc(argv),
        ]  # fmt: skip
        log = Path(tmp, "launch.log")
        with open(log, "wb") as sink:
            code = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env).returncode
        if code == 0 and Path(tmp, "result.json").is_file():
            return dict(json.loads(Path(tmp, "result.json").read_text()))
        _drop_partial(Path(out))
        message, exit_code = failure(Path(tmp), log.read_text(errors="replace"), nproc)
        raise DistributedError(message, exit_code)


def failure(errors: Path, log: str, nproc: int) -> tuple[str, int]:
    """One message for a failed job: the first rank that failed on its own (not because
    another stopped), else the root cause torchrun observed (a rank killed), else the end of
    its log."""
    found = [json.loads(p.read_text()) for p in sorted(errors.glob("rank*.json"))]
    own = [e for e in found if e["kind"] != "peer"]
    if own:
        first = min(own, key=lambda e: (e["at"], e["rank"]))
        code = 2 if first["kind"] == "input" else 1
        return f"rank {first['rank']} of {nproc} failed: {first['message']}", code
    seen = _torchrun_failures(log)
    if seen:
        # torchrun can observe a consequence before its cause: a rank killed by a signal from
        # outside (SIGKILL: the OOM killer) goes first, then one that exited with a code (a
        # survivor stops with 1 once its peer is lost), then one that aborted (gloo's SIGABRT)
        # or was terminated by torchrun (SIGTERM)
        rank, status = min(seen, key=lambda rs: _cause_rank(rs[1]))
        how = f"was killed by signal {-status}" if status < 0 else f"exited with {status}"
        return f"rank {rank} of {nproc} {how}; the job stopped and wrote no artifact", 1
    tail = " | ".join(line for line in log.strip().splitlines()[-3:])
    return f"the distributed run failed; no artifact written (last output: {tail})", 1


CONSEQUENT = (-6, -15)  # SIGABRT, SIGTERM


def _cause_rank(status: int) -> int:
    """How likely an exit ``status`` is the cause of a failed job (lower: more; see failure)."""
    return 2 if status in CONSEQUENT else 0 if status < 0 else 1


def _torchrun_failures(log: str) -> list[tuple[int, int]]:
    """(rank, exit status) of every failure in torchrun's last summary, its root cause first."""
    summary = log.rpartition("Failures:")[2] if "Failures:" in log else log
    others, _, root = summary.rpartition("Root Cause")
    pattern = r"^\s*rank\s*:\s*(\d+).*?^\s*exitcode\s*:\s*(-?\d+)"
    found = re.findall(pattern, root, re.S | re.M) + re.findall(pattern, others, re.S | re.M)
    return [(int(rank), int(status)) for rank, status in found]


def _drop_partial(out: Path) -> None:
    """A rank killed while writing leaves the atomic writer's hidden build directory."""
    for tmp in temp_siblings(out):
        shutil.rmtree(tmp, ignore_errors=True)
