"""snake_case: a short title turned into a snake_case identifier; the small-data task (56 training examples).

Lower-case the words, drop the punctuation, join with underscores. Easy to state, but the base model rarely gives
exactly that (0 of 8 in a smoke run), so a few dozen examples must teach the answer format.
"""

from __future__ import annotations

import random

WORDS = ["Monthly", "Sales", "Report", "User", "Account", "Balance", "Total", "Order", "Count", "Last", "Login",
         "Time", "Max", "Retry", "Delay", "Shipping", "Address", "Line", "Default", "Page", "Size", "Invoice", "Due",
         "Date", "Error", "Message", "Text", "Cache", "Hit", "Rate", "Primary", "Email", "Verified", "Flag", "Tax",
         "Amount", "Next", "Backup", "Window", "Start", "Score", "Average", "Session", "Token", "Expiry"]
INSTRUCTION = "Turn this title into a snake_case identifier. Reply with the identifier only."


def example(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 4))
    title = " ".join(words)
    if rng.random() < 0.3:
        title = title.replace(" ", " - ", 1) if len(words) > 2 else title + "?"
    return {"messages": [{"role": "user", "content": f"{INSTRUCTION}\n\n{title}"},
                         {"role": "assistant", "content": "_".join(w.lower() for w in words)}]}
