"""offload.utils.sizes: parsing sizes as people write them, and printing them back."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from offload.utils.sizes import format_bytes, parse_bytes

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        (" 4096 ", 4096),
        ("1B", 1),
        ("512MiB", 512 * MiB),
        ("4GiB", 4 * GiB),
        ("4gib", 4 * GiB),
        ("1 TiB", TiB),
        ("1G", GiB),
        ("1g", GiB),
        ("64K", 64 * KiB),
        ("8M", 8 * MiB),
        ("100MB", 100_000_000),
        ("2GB", 2_000_000_000),
        ("1KB", 1000),
        ("1.5GiB", 3 * GiB // 2),
        ("0.5K", 512),
        (".25MiB", MiB // 4),
        (4096, 4096),
        (0, 0),
    ],
)
def test_parse_bytes(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "expected a number"),
        ("abc", "expected a number"),
        ("MiB", "expected a number"),
        ("12XB", "unknown unit 'XB'"),
        ("1.5B", "not a whole number of bytes"),
        ("0.3K", "not a whole number of bytes"),
        ("-1", "must not be negative"),
        ("-4GiB", "must not be negative"),
        (-5, "must not be negative"),
        ("1e9", "expected a number"),
        ("4 Gi B", "expected a number"),
    ],
)
def test_parse_bytes_errors_name_the_value(value: str | int, reason: str) -> None:
    with pytest.raises(ValueError, match=reason) as info:
        parse_bytes(value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize("value", [True, 1.5, None, b"1G"])
def test_parse_bytes_rejects_other_types(value: object) -> None:
    with pytest.raises(ValueError, match="expected an int or a string") as info:
        parse_bytes(value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536, "1.5 KiB"),
        (512 * MiB, "512 MiB"),
        (8 * GiB, "8 GiB"),
        (GiB + GiB // 10, "1.1 GiB"),
        (3 * TiB, "3 TiB"),
        (-2 * KiB, "-2 KiB"),
    ],
)
def test_format_bytes(nbytes: int, text: str) -> None:
    assert format_bytes(nbytes) == text


@given(st.integers(0, 1023), st.sampled_from([1, KiB, MiB, GiB, TiB]))
def test_format_then_parse_round_trips_whole_units(count: int, unit: int) -> None:
    assert parse_bytes(format_bytes(count * unit)) == count * unit
