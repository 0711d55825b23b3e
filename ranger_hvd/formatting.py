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


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters (an ellipsis marks the cut)."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def short_repr(value: Any, limit: int = 60) -> str:
    """repr() cut to ``limit`` characters, for messages: a long string or container is never rendered whole."""
    if isinstance(value, (str, bytes)) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (list, tuple, dict, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    return clip(repr(value), limit)


def shown(text: str, limit: int = 80) -> str:
    """A name for a message: as it is when printable (cut to ``limit``), else its short repr()."""
    return clip(text, limit) if text.isprintable() else short_repr(text, limit)
