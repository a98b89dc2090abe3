"""Trials as Ray tasks (``slimtorch auto --runner ray``): one trial per task, on a local Ray
instance or an existing cluster (docs/auto.md, "Running trials on Ray").

The task is :func:`slimtorch.search.trials.run_trial` of the JSON spec alone (the worker loads
the model and data itself), and its result comes back as a plain dict; only the search process
appends to ``trials.jsonl``. A worker that can see the search's ``OUT/trials`` (the same machine
or a shared file system, checked with a token file) writes the artifact there; any other worker
writes into a temporary directory and ships the files back, and the driver lands them.

Ray is an optional extra (``pip install 'slimtorch[ray]'``) imported only when a search runs.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slimtorch.core.errors import ArtifactError, ConfigError
from slimtorch.formats.atomic import swap_into_place, temp_sibling
from slimtorch.search.trials import failed, run_trial

log = logging.getLogger(__name__)
INSTALL = "pip install 'slimtorch[ray]'"
FILES = "_files"  # result key of an artifact shipped back by a worker without shared storage


@dataclass
class RaySettings:
    """Where and how trials run on Ray. ``address``: None starts a local Ray instance (loopback
    only, no dashboard, ``workers x cpus_per_trial`` CPUs); ``auto`` or ``ray://host:10001``
    joins a running cluster. ``cpus_per_trial`` None: the search's torch threads per trial."""

    address: str | None = None
    cpus_per_trial: float | None = None
    gpus_per_trial: float = 0.0
    log_to_driver: bool = False


def require_ray() -> Any:
    """The ``ray`` module, or a ConfigError with the install line."""
    try:
        import ray
    except ImportError as exc:
        raise ConfigError(
            f"--runner ray needs Ray, an optional extra: {INSTALL} (or use --runner local)"
        ) from exc
    return ray


def check_settings(settings: RaySettings) -> None:
    if settings.cpus_per_trial is not None and not settings.cpus_per_trial > 0:
        raise ConfigError(f"--ray-cpus-per-trial must be positive, got {settings.cpus_per_trial}")
    if not settings.gpus_per_trial >= 0:
        raise ConfigError(f"--ray-gpus-per-trial must be >= 0, got {settings.gpus_per_trial}")


def _pack(directory: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def ray_trial(spec: dict[str, Any], token_path: str, token: str) -> dict[str, Any]:
    """The Ray task: :func:`run_trial`, writing into ``spec["out"]`` when this worker sees the
    search's token file there, else into a temporary directory whose files it returns."""
    try:
        shared = Path(token_path).read_text() == token
    except OSError:
        shared = False
    if shared:
        return run_trial(spec)
    tmp = Path(tempfile.mkdtemp(prefix="slimtorch-ray-"))
    try:
        out = tmp / "artifact"
        result = run_trial({**spec, "out": str(out)})
        if result["status"] == "ok":
            result[FILES] = _pack(out)
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def land(result: dict[str, Any], out: str) -> dict[str, Any]:
    """Write an artifact shipped back in ``result`` into ``out`` (atomically: a temporary
    sibling, then a rename); returns the result without the files."""
    files = result.pop(FILES, None)
    if files is None:
        return result
    target = Path(out)
    tmp = temp_sibling(target)
    try:
        for name, data in files.items():
            path = tmp / name
            if not path.resolve().is_relative_to(tmp.resolve()):
                raise ValueError(f"artifact file {name!r} escapes its directory")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        swap_into_place(tmp, target, overwrite=True)
    except (OSError, ValueError, ArtifactError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        return failed({"id": result.get("id")}, f"could not write the artifact: {exc}")
    return result


def portable(spec: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with its local paths (output, and model or data when they are files here)
    made absolute: a Ray worker does not run in the search's working directory."""
    fixed = {**spec, "out": str(Path(spec["out"]).absolute())}
    for key in ("model", "data", "eval_data"):
        value = spec.get(key)
        if isinstance(value, str) and ":" not in value and os.path.exists(value):
            fixed[key] = str(Path(value).absolute())
    return fixed


class RayRunner:
    """Runs each trial spec as one Ray task (``num_cpus=cpus_per_trial``, ``num_gpus``).

    Ray starts (or is joined) at the first :meth:`run`; :meth:`close` shuts down only a Ray
    instance this runner started. ``workers`` sizes a local instance; on a cluster, Ray's
    scheduler decides how many trials run at once."""

    def __init__(self, settings: RaySettings, workers: int = 2, threads: int = 1) -> None:
        check_settings(settings)
        self.ray = require_ray()
        self.settings, self.workers = settings, max(1, workers)
        self.cpus = settings.cpus_per_trial or float(max(1, threads))
        self._started = False
        self._task: Any = None
        self._pending: dict[Any, dict[str, Any]] = {}
        self._token: tuple[Path, str] | None = None

    def _start(self) -> Any:
        ray, s = self.ray, self.settings
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {
                "address": s.address,
                "log_to_driver": s.log_to_driver,
                "logging_level": logging.WARNING,
            }
            if s.address is None and not os.environ.get("RAY_ADDRESS"):
                # a private instance: this machine only (loopback), no dashboard, no usage reports
                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
                kwargs["include_dashboard"] = False
                kwargs["num_cpus"] = max(1, round(self.workers * self.cpus))
                kwargs["_node_ip_address"] = "127.0.0.1"
            main = threading.current_thread() is threading.main_thread()
            sigterm = signal.getsignal(signal.SIGTERM) if main else None
            try:
                ray.init(**kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise ConfigError(
                    f"could not start or join Ray at {s.address or 'a local instance'}: {exc};"
                    " start a cluster with `ray start --head` and pass --ray-address auto"
                ) from exc
            finally:  # ray.init installs its own SIGTERM exit: keep the search's (stop, resume)
                if sigterm is not None:
                    signal.signal(signal.SIGTERM, sigterm)
            self._started = True
        if self._task is None:
            self._task = ray.remote(
                num_cpus=self.cpus, num_gpus=self.settings.gpus_per_trial, max_retries=0
            )(ray_trial)
        return self._task

    def _token_for(self, specs: Sequence[dict[str, Any]]) -> tuple[str, str]:
        if self._token is None:
            folder = Path(specs[0]["out"]).absolute().parent
            folder.mkdir(parents=True, exist_ok=True)
            token = uuid.uuid4().hex
            path = folder / f".ray-shared-{token[:12]}"
            path.write_text(token)
            self._token = (path, token)
        return str(self._token[0]), self._token[1]

    def run(self, specs: Sequence[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        if not specs:
            return
        task = self._start()
        token_path, token = self._token_for(specs)
        self._pending = {task.remote(portable(s), token_path, token): s for s in specs}
        try:
            while self._pending:
                (ref,), _ = self.ray.wait(list(self._pending), num_returns=1)
                spec = self._pending.pop(ref)
                try:
                    result = self.ray.get(ref)
                except Exception as exc:  # a lost worker or node: that trial failed
                    yield failed(spec, f"{type(exc).__name__}: {exc}")
                    continue
                yield land(result, spec["out"])
        finally:
            self.terminate()

    def terminate(self) -> None:
        """Cancel the trials still queued or running."""
        pending, self._pending = self._pending, {}
        for ref in pending:
            try:
                self.ray.cancel(ref, force=True)
            except Exception as exc:  # already finished or gone
                log.debug("could not cancel a Ray task: %s", exc)

    def close(self) -> None:
        self.terminate()
        if self._token is not None:
            self._token[0].unlink(missing_ok=True)
            self._token = None
        if self._started:
            self.ray.shutdown()
            self._started = False
        self._task = None
