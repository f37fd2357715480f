"""Byte sizes written by people: ``"80GB"``, ``"40GiB"``, ``"512MB"``.

Device memory is sold in decimal units (an "80GB" H100) while tools and kernels often report
binary ones, so both are accepted and kept apart: ``GB`` is 10**9 bytes and ``GiB`` is 2**30.
Bare suffixes such as ``"80G"`` are rejected because they are ambiguous between the two.
"""

from __future__ import annotations

import re

from autopart.errors import AutopartError

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}

_PATTERN = re.compile(
    r"^\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$"
)


def parse_bytes(value: int | str) -> int:
    """Return the number of bytes that ``value`` (an int or a string like ``"80GB"``) means."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise AutopartError(
            f"a byte size must be an integer or a string like '80GB', not {value!r}"
        )
    if isinstance(value, int):
        if value < 0:
            raise AutopartError(f"a byte size cannot be negative: {value}")
        return value
    match = _PATTERN.match(value)
    if not match:
        raise AutopartError(
            f"cannot read byte size {value!r}; write a number with a unit, e.g. '80GB' (10**9) "
            "or '40GiB' (2**30)"
        )
    unit = match.group(2).lower() or "b"
    if unit not in _UNITS:
        raise AutopartError(
            f"unknown unit {match.group(2)!r} in byte size {value!r}; use one of B, KB, MB, GB, "
            "TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)"
        )
    return round(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Binary units, as memory tools report them."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"
