"""Byte sizes as text (``'10G'``, ``'500M'``): parsed once for the settings and the feature cache."""

from __future__ import annotations

import math
import re

__all__ = ["parse_size", "size_text"]


def parse_size(text: str | int | float) -> int:
    """``'32M'``, ``'1G'``, ``'0.5G'``, ``'1e9'``, ``'500k'``, ``'1048576'`` -> bytes (powers of 1024;
    an optional ``B``/``iB`` after the unit). ValueError unless a finite number; the sign is kept
    (callers check the range)."""
    if isinstance(text, bool):
        raise ValueError(text)
    if isinstance(text, int):
        return text
    if isinstance(text, float):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+\-]+?)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(text))
        if not m:
            raise ValueError(text)
        try:
            value = float(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
        except ValueError:
            raise ValueError(text) from None
    if not math.isfinite(value):
        raise ValueError(text)
    return int(value)


def size_text(n: int) -> str:
    """Bytes as ``parse_size`` reads them back: ``'10G'``, ``'32M'``, ``'1536'``."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("k", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)
