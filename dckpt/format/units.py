"""Human-readable quantities for reports."""
from __future__ import annotations


def human_size(n: float | None) -> str:
    """Bytes in SI units (kB = 1000 B), as disks and links are measured."""
    if n is None:
        return "-"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
