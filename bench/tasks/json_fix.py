"""json_fix: a broken JSON-like object (Python literals, single quotes, bare keys, a trailing comma, a lost brace)
repaired into compact JSON, the way ``json.dumps(obj, separators=(",", ":"))`` writes it.

Each example breaks the object one to three ways, applied throughout the object, as a hand-edited config or a
logged Python dict would be; the answer keeps the key order.
"""

from __future__ import annotations

import json
import random

FIELDS = {
    "name": lambda rng: rng.choice(["Ada Park", "Liu Wen", "Omar Diaz", "Greta Holm", "Sam Osei", "Noor Ali"]),
    "city": lambda rng: rng.choice(["Porto", "Tartu", "Busan", "Leeds", "Cusco", "Graz", "Oaxaca"]),
    "age": lambda rng: rng.randint(18, 90),
    "count": lambda rng: rng.randint(0, 500),
    "price": lambda rng: round(rng.uniform(1, 200), 2),
    "active": lambda rng: rng.random() < 0.5,
    "verified": lambda rng: rng.random() < 0.5,
    "note": lambda rng: rng.choice([None, "call back", "gift", "urgent", "paid"]),
}
BREAKS = ("python_literals", "single_quotes", "bare_keys", "trailing_comma", "missing_brace")
INSTRUCTION = "Repair this into valid JSON. Reply with compact JSON only (no spaces after , or :)."


def _value(value, breaks: set[str]) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value) if "python_literals" in breaks else json.dumps(value)
    if isinstance(value, str):
        return f"'{value}'" if "single_quotes" in breaks else json.dumps(value)
    return json.dumps(value)


def _key(key: str, breaks: set[str]) -> str:
    if "bare_keys" in breaks:
        return key
    return f"'{key}'" if "single_quotes" in breaks else json.dumps(key)


def example(rng: random.Random) -> dict:
    keys = rng.sample(list(FIELDS), rng.randint(2, 4))
    obj = {k: FIELDS[k](rng) for k in keys}
    breaks = set(rng.sample(BREAKS, rng.randint(1, 3)))
    if "python_literals" in breaks and not any(isinstance(v, bool) or v is None for v in obj.values()):
        obj["active"] = True  # so the break shows in the text
    sep = rng.choice([", ", ","])
    body = sep.join(f"{_key(k, breaks)}: {_value(v, breaks)}" for k, v in obj.items())
    broken = "{" + body + ("," if "trailing_comma" in breaks else "") + ("" if "missing_brace" in breaks else "}")
    return {"prompt": f"{INSTRUCTION}\n\n{broken}", "completion": json.dumps(obj, separators=(",", ":"))}
