"""Device profiles: named budgets for ``slimtorch auto --profile NAME|file.yaml``.

The shipped profiles live in ``search/profiles/*.yaml`` (``mcu``, ``phone``, ``server``). A
user's YAML file holds the same fields and may start from a shipped one with ``extends``::

    extends: phone
    max_size: 8MB          # 2MB, 500KB, 512KiB, or 20x (the fp32 size divided by 20)
    max_drop: 0.5          # in the model's metric (accuracy points, Pearson r, ...)

Latency budgets are measured on the machine that runs the search, with ``threads`` torch (or
onnxruntime) threads and batch ``latency_batch``: a proxy for the device, not the device.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from slimtorch.core.config import StrictModel
from slimtorch.core.errors import ConfigError

PROFILE_DIR = Path(__file__).parent / "profiles"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30})


class Profile(StrictModel):
    """A named budget: size, latency and quality loss, and how latency is measured."""

    description: str = ""
    extends: str | None = None
    max_size: str | None = Field(None, description="2MB, 500KB, 512KiB, or 20x (fp32 / 20)")
    max_latency_ms: float | None = Field(None, gt=0)
    max_drop: float | None = Field(None, ge=0)
    threads: int = Field(1, ge=1, le=256)
    latency_batch: int = Field(1, ge=1)
    runtime: Literal["torch", "onnx"] = "torch"
    speed: float = Field(
        1.0,
        gt=0,
        description="compute speed relative to one thread of the machine that measures (2.0:"
        " twice as fast); `slimtorch split` scales measured latency by it. A model of the"
        " device class, not a measurement of it",
    )


def parse_size(text: str | int, dense_bytes: int) -> int:
    """Bytes from ``2MB``, ``500KB``, ``512KiB``, ``123456`` or ``20x`` (= ``dense_bytes / 20``)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper()
        ratio = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*X", s)
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([KMG]?I?B)?", s)
        if ratio:
            factor = float(ratio.group(1))
            if factor < 1:
                raise ConfigError(f"--max-size {text!r}: a ratio must be at least 1x, e.g. 20x")
            value = int(dense_bytes / factor)
        elif m and (m.group(2) or "B") in _UNITS:
            value = int(float(m.group(1)) * _UNITS[m.group(2) or "B"])
        else:
            raise ConfigError(
                f"cannot read the size budget {text!r}; write e.g. 2MB, 500KB, 512KiB or 20x"
                " (20 times smaller than the fp32 model)"
            )
    if value <= 0:
        raise ConfigError(f"the size budget {text!r} must be positive; e.g. 2MB or 20x")
    return value


def builtin_profiles() -> dict[str, str]:
    """Shipped profile name -> description."""
    return {p.stem: _read(p).description for p in sorted(PROFILE_DIR.glob("*.yaml"))}


def _raw(path: Path) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read profile {path}: {exc}; give a YAML mapping") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a YAML mapping of budget fields")
    return raw


def _validate(raw: dict[str, Any], where: str) -> Profile:
    try:
        return Profile.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        fields = ", ".join(Profile.model_fields)
        raise ConfigError(
            f"profile {where}: {loc}: {err['msg']} (got {err.get('input')!r}); fields: {fields}"
        ) from None


def _read(path: Path) -> Profile:
    return _validate(_raw(path), str(path))


def load_profile(name: str) -> tuple[str, Profile]:
    """A shipped profile by name, or a YAML file (``extends`` starts from a shipped one)."""
    shipped = PROFILE_DIR / f"{name}.yaml"
    if shipped.is_file():
        return name, _read(shipped)
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        raise ConfigError(
            f"unknown profile {name!r}: give one of {', '.join(builtin_profiles())} or a YAML"
            " file of budget fields"
        )
    raw = _raw(path)
    base: dict[str, Any] = {}
    parent = raw.get("extends")
    if parent is not None:
        if not (PROFILE_DIR / f"{parent}.yaml").is_file():
            raise ConfigError(
                f"profile {path}: extends {parent!r}, which is not a shipped profile; use one"
                f" of {', '.join(builtin_profiles())}"
            )
        base = _raw(PROFILE_DIR / f"{parent}.yaml")
    merged = {**base, **raw}
    _validate(raw, str(path))  # the file's own typos name the file
    return path.stem, _validate(merged, str(path))


def parse_duration(text: str | float | None) -> float | None:
    """Seconds from ``600``, ``90s``, ``10m`` or ``1.5h`` (None stays None)."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", str(text).lower())
    if m is None or float(m.group(1)) <= 0:
        raise ConfigError(f"cannot read the time budget {text!r}; write e.g. 600, 90s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]
