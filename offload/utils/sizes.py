"""Byte sizes as people write them ("512MiB", "4G", "100MB") and as the CLI prints them.

Binary suffixes (KiB ... PiB) and bare letters (K, M, G, T, P) are powers of 1024, as in fio,
dd and ulimit; KB, MB, GB, TB, PB are powers of 1000. Suffixes are case-insensitive.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_UNITS: dict[str, int] = {"": 1, "b": 1}
for _i, _letter in enumerate("kmgtp", start=1):
    _UNITS[_letter] = 1024**_i
    _UNITS[f"{_letter}ib"] = 1024**_i
    _UNITS[f"{_letter}b"] = 1000**_i

_SIZE = re.compile(r"^\s*(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)\s*$")
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_bytes(value: str | int) -> int:
    """Number of bytes in value: a non-negative int, or a string like "512MiB", "1.5G", "4096".

    Raises ValueError naming the value when it is not a size or not a whole number of bytes.
    """
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"invalid size {value!r}: expected an int or a string like '512MiB'")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"invalid size {value!r}: must not be negative")
        return value
    m = _SIZE.match(value)
    if m is None and value.strip().startswith("-"):
        raise ValueError(f"invalid size {value!r}: must not be negative")
    if m is None:
        raise ValueError(
            f"invalid size {value!r}: expected a number with an optional unit, like '512MiB' or '4G'"
        )
    unit = m.group("unit").lower()
    if unit not in _UNITS:
        raise ValueError(
            f"invalid size {value!r}: unknown unit {m.group('unit')!r} (use B, KiB, MiB, GiB, TiB, PiB, K, M, G, T, P, KB, MB, GB, TB, PB)"
        )
    try:
        exact = Decimal(m.group("num")) * _UNITS[unit]
    except InvalidOperation:
        raise ValueError(f"invalid size {value!r}: {m.group('num')!r} is not a number") from None
    if exact != exact.to_integral_value():
        raise ValueError(f"invalid size {value!r}: not a whole number of bytes ({exact})")
    return int(exact)


def format_bytes(nbytes: int) -> str:
    """nbytes in the largest binary unit that keeps the number at least 1: "512 MiB", "1.5 GiB"."""
    sign = "-" if nbytes < 0 else ""
    n = abs(int(nbytes))
    exp = 0
    while exp + 1 < len(_BINARY) and n >= 1024 ** (exp + 1):
        exp += 1
    if exp == 0:
        return f"{sign}{n} B"
    if n % 1024**exp == 0:
        return f"{sign}{n // 1024**exp} {_BINARY[exp]}"
    return f"{sign}{n / 1024**exp:.1f} {_BINARY[exp]}"
