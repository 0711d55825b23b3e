"""How numbers look in the launcher's tables and messages."""

from __future__ import annotations

from typing import Any, Optional


def fmt_bytes(n: Optional[float]) -> str:
    """1234567 -> '1.23 MB', 10000 -> '10.0 KB' (3 significant digits, powers of 1000); None -> '-'."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000.0
    if unit == "B" or abs(n) >= 999.5:
        return f"{n:.0f} {unit}"
    return f"{n:#.3g}".rstrip(".") + f" {unit}"


def fmt_value(v: Any) -> str:
    """Floats with 4 significant digits, anything else as str()."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
