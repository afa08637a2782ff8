"""date_iso: a date written one of eight ways, converted to ISO 8601 (``YYYY-MM-DD``).

Day-first numeric dates use dots (``05.03.2024``) and year-first ones slashes (``2024/03/05``), so every input has
one reading; weekdays are the true ones for the date.
"""

from __future__ import annotations

import datetime
import random

START = datetime.date(1950, 1, 1)
DAYS = (datetime.date(2035, 12, 31) - START).days


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def written(d: datetime.date, style: int) -> str:
    """``d`` in one of eight common spellings."""
    month, short = d.strftime("%B"), d.strftime("%b")
    return [f"{month} {d.day}, {d.year}", f"{d.day} {month} {d.year}", f"{d.day} {short} {d.year}",
            f"{short} {_ordinal(d.day)} {d.year}", f"{d.year}/{d.month:02d}/{d.day:02d}",
            f"{d.day:02d}.{d.month:02d}.{d.year}", f"{d.strftime('%A')}, {d.day} {month} {d.year}",
            f"the {_ordinal(d.day)} of {month}, {d.year}"][style]


def example(rng: random.Random) -> dict:
    d = START + datetime.timedelta(days=rng.randrange(DAYS + 1))
    return {"instruction": f"Write this date in ISO 8601 form (YYYY-MM-DD): {written(d, rng.randrange(8))}",
            "output": d.isoformat()}
