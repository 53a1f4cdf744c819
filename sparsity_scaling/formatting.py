"""Numbers, durations and plain-text tables for people to read (terminal output, reports)."""

from __future__ import annotations

import math


def sci(value, digits: int = 3) -> str:
    """The Sparsing Law paper's number style, 1.01e-1 and 3.20e+0; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa}e{int(exponent):+d}"


def interval(low, high) -> str:
    return f"[{sci(low)}, {sci(high)}]"


def short_count(n: int) -> str:
    """1.5M, 32.8K: a token count short enough for a label."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def duration(seconds: float) -> str:
    """1h02m03s, 4m05s: an elapsed time or an ETA."""
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def table(headers, rows) -> str:
    """Left-aligned columns separated by two spaces."""
    rows = [[str(cell) for cell in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths)).rstrip(),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)
