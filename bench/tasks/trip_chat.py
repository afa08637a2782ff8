"""trip_chat: a multi-turn chat that states two or three travel details, may change one, then asks for one back.

Chat ``messages`` with a system prompt and three to five user turns; the assistant confirms each detail, and its
last answer is the asked-for detail alone (checked by exact match). When a detail was changed, the question asks for
it more often than not, so the answer must come from the latest turn that set it.
"""

from __future__ import annotations

import random

SYSTEM = "You are a travel assistant. Confirm each detail briefly, and answer questions with the detail only."
AIRLINES = ["KL", "BA", "LH", "AF", "TP", "SK", "IB", "AZ"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
HOTELS = ["Hotel Miramar", "The Linden", "Casa Azul", "Harbour Lodge", "Hotel Nord", "The Foundry", "Villa Rosa"]
CARS = ["Toyota Yaris", "Fiat Panda", "VW Golf", "Skoda Octavia", "Renault Clio", "Kia Ceed"]
RENTERS = ["Hertz", "Sixt", "Avis", "Europcar"]
RESTAURANTS = ["Casa Lola", "Blue Fig", "Trattoria Sole", "The Oyster Bar", "Sakura House", "Le Petit Four"]


def _time(rng: random.Random) -> str:
    return f"{rng.randint(6, 22):02d}:{rng.choice([0, 10, 15, 20, 30, 40, 45, 50]):02d}"


def _facts(rng: random.Random) -> dict[str, dict[str, str]]:
    return {
        "flight": {"code": f"{rng.choice(AIRLINES)} {rng.randint(100, 1999)}", "day": rng.choice(DAYS),
                   "time": _time(rng)},
        "hotel": {"hotel": rng.choice(HOTELS), "room": str(rng.randint(101, 940))},
        "car": {"car": rng.choice(CARS), "renter": rng.choice(RENTERS), "pickup": _time(rng)},
        "dinner": {"restaurant": rng.choice(RESTAURANTS), "people": str(rng.randint(2, 8))},
    }


def _state(kind: str, f: dict[str, str]) -> tuple[str, str]:
    """(user turn, assistant confirmation) that set the details of ``kind``."""
    if kind == "flight":
        return (f"My flight is {f['code']} on {f['day']} at {f['time']}.",
                f"Noted: flight {f['code']}, {f['day']} at {f['time']}.")
    if kind == "hotel":
        return f"I'm staying at {f['hotel']}, room {f['room']}.", f"Noted: {f['hotel']}, room {f['room']}."
    if kind == "car":
        return (f"I rented a {f['car']} from {f['renter']}, pick-up at {f['pickup']}.",
                f"Noted: {f['car']} from {f['renter']}, pick-up at {f['pickup']}.")
    return (f"Dinner is booked at {f['restaurant']} for {f['people']} people.",
            f"Noted: {f['restaurant']}, table for {f['people']}.")


QUESTIONS = {"code": "What is my flight number?", "day": "Which day do I fly?", "time": "What time is my flight?",
             "hotel": "Which hotel am I staying at?", "room": "What is my room number?",
             "car": "Which car did I rent?", "renter": "Which company did I rent the car from?",
             "pickup": "What time do I pick up the car?", "restaurant": "Where is dinner booked?",
             "people": "How many people is dinner for?"}
CHANGES = {"time": "Change of plan: the flight now leaves at {}.", "room": "They moved me to room {}.",
           "pickup": "The car pick-up is now at {}.", "people": "Make the dinner for {} people instead."}


def example(rng: random.Random) -> dict:
    facts = _facts(rng)
    kinds = rng.sample(list(facts), rng.randint(2, 3))
    messages = [{"role": "system", "content": SYSTEM}]
    for kind in kinds:
        user, reply = _state(kind, facts[kind])
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    changeable = [(k, field) for k in kinds for field in facts[k] if field in CHANGES]
    changed = None
    if changeable and rng.random() < 0.4:
        kind, changed = rng.choice(changeable)
        old = facts[kind][changed]
        while facts[kind][changed] == old:  # a change must change something
            facts[kind][changed] = _time(rng) if changed in ("time", "pickup") else \
                str(rng.randint(101, 940) if changed == "room" else rng.randint(2, 8))
        messages += [{"role": "user", "content": CHANGES[changed].format(facts[kind][changed])},
                     {"role": "assistant", "content": "Updated: " + _state(kind, facts[kind])[1][len("Noted: "):]}]
    fields = [(k, field) for k in kinds for field in facts[k]]
    kind, field = next((k, f) for k, f in fields if f == changed) if changed and rng.random() < 0.6 \
        else rng.choice(fields)
    messages += [{"role": "user", "content": QUESTIONS[field]}, {"role": "assistant", "content": facts[kind][field]}]
    return {"messages": messages}
