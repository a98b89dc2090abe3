"""The end-to-end latency of a device/server split, as pure functions.

    latency(cut) = device(cut) / device_speed + transfer(cut) + server(cut) / server_speed
    transfer(cut) = rtt + bytes(cut) * 8 / bandwidth     (0 when everything runs on the device)

``device(cut)`` and ``server(cut)`` are sums of per-segment latencies measured on the machine
that plans (one thread); a profile's ``speed`` scales them (2.0: twice as fast as that
machine). The speed factors of the shipped profiles are a model of a device class, not a
measurement of one. ``bytes(cut)`` is what crosses the link per request: dense, or with
``int8`` every floating-point tensor as uint8 codes plus a float32 scale and offset per row
(:func:`int8_bytes`). The server's answer is small and not counted (say so when reporting).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from slimtorch.core.errors import ConfigError

_RATE = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_bandwidth(text: str | float) -> float:
    """Bits per second from ``20Mbps``, ``1Gbps``, ``500kbps``, ``2.5MB/s`` or a number (bps)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        s = str(text).strip()
        m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([kKmMgG]?)(bps|bit/s|B/s|Bps)?", s)
        if m is None:
            raise ConfigError(
                f"cannot read the bandwidth {text!r}; write e.g. 20Mbps, 1Gbps, 500kbps or"
                " 2.5MB/s (bytes per second)"
            )
        unit = m.group(3) or "bps"
        value = float(m.group(1)) * _RATE[m.group(2).upper()] * (8 if unit in ("B/s", "Bps") else 1)
    if value <= 0:
        raise ConfigError(f"the bandwidth {text!r} must be positive; e.g. 20Mbps")
    return value


def int8_bytes(shape: Sequence[int], dtype_bytes: int, floating: bool) -> int:
    """Bytes of one tensor sent as uint8 codes with a float32 scale and offset per row: per
    token for 3-D ``[batch, tokens, features]``, per sample otherwise (see
    :func:`slimtorch.search.split_measure.encode_int8`)."""
    sizes = [max(int(s), 1) for s in shape]
    count = 1
    for s in sizes:
        count *= s
    if not floating:
        return count * dtype_bytes
    rows = sizes[0] * sizes[1] if len(sizes) == 3 else (sizes[0] if sizes else 1)
    return count + 8 * rows


@dataclass(frozen=True)
class Link:
    """The network between device and server."""

    bandwidth_bps: float
    rtt_ms: float = 0.0


@dataclass(frozen=True)
class CutCost:
    """The predicted latency of one cut, in milliseconds."""

    index: int
    device_ms: float
    transfer_ms: float
    server_ms: float

    @property
    def total_ms(self) -> float:
        return self.device_ms + self.transfer_ms + self.server_ms


def transfer_ms(nbytes: int, link: Link, all_on_device: bool) -> float:
    """Milliseconds to send ``nbytes`` over ``link`` (nothing when no server part runs)."""
    if all_on_device:
        return 0.0
    return link.rtt_ms + nbytes * 8.0 / link.bandwidth_bps * 1000.0


def cut_costs(
    segments: tuple[Sequence[float], Sequence[float]],
    cut_bytes: Sequence[int],
    speeds: tuple[float, float],
    link: Link,
) -> list[CutCost]:
    """The cost of every cut. ``segments`` = (device, server) milliseconds of the segment
    between cut ``i`` and ``i + 1`` measured here (the device's may be of the compressed model:
    one more cut than segments), ``cut_bytes[i]`` what crosses cut ``i``, ``speeds`` =
    (device, server) relative to the machine that measured."""
    device_seg, server_seg = segments
    if not len(cut_bytes) == len(device_seg) + 1 == len(server_seg) + 1:
        raise ValueError(f"{len(cut_bytes)} cuts need {len(cut_bytes) - 1} segments per side")
    device_speed, server_speed = speeds
    costs = []
    last = len(cut_bytes) - 1
    for i, nbytes in enumerate(cut_bytes):
        costs.append(
            CutCost(
                i,
                float(sum(device_seg[:i])) / device_speed,
                transfer_ms(nbytes, link, i == last),
                float(sum(server_seg[i:])) / server_speed,
            )
        )
    return costs


def best_cut(costs: Sequence[CutCost]) -> CutCost:
    """The cut with the lowest total; ties go to the earliest (least work on the device)."""
    return min(costs, key=lambda c: (round(c.total_ms, 9), c.index))
