"""Numbers as people read them: byte sizes and large counts (the CLI, the cache listing and the
dashboard use these one definitions)."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``1536`` → ``1.5 KiB`` (binary units; whole bytes below 1 KiB)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def format_count(n: float) -> str:
    """``1234567`` → ``1.23M`` (three significant digits, K/M/B/T)."""
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{unit}"
        n /= 1000
    return f"{n:.3g}P"
