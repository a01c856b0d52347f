"""Sizes written for people: the dry run's and ``inspect``'s byte counts."""

from __future__ import annotations

UNITS = ("KiB", "MiB", "GiB", "TiB")


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.5 KiB`` ... ``2.0 TiB`` (larger sizes stay in TiB)."""
    if n < 1024:
        return f"{n:.0f} B"
    for unit in UNITS:
        n /= 1024
        if n < 1024 or unit == UNITS[-1]:
            break
    return f"{n:.1f} {unit}"
