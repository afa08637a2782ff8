"""booking_fields: four fields out of a hotel booking message at once, answered as ``key=value`` pairs.

The fields come in any order and wording; nights may be written as a word ("three nights"), and the answer always
gives them as a digit, so the task is a little more than copying spans.
"""

from __future__ import annotations

import random

FIRST = ["Priya", "Tomasz", "Aiko", "Kwame", "Leonie", "Mateo", "Sunita", "Olek", "Fatima", "Henrik", "Yara",
         "Dmitri", "Camille", "Ravi", "Ingrid", "Joao", "Mei", "Santiago", "Zofia", "Emeka"]
LAST = ["Raman", "Nowak", "Sato", "Mensah", "Vogel", "Herrera", "Iyer", "Petrov", "Haddad", "Lund", "Okafor",
        "Moreau", "Kaur", "Bergstrom", "Alves", "Lin", "Duarte", "Wojcik", "Eze", "Novak"]
ROOMS = ["single", "double", "twin", "suite", "family"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
WORDS = ["one", "two", "three", "four", "five", "six", "seven"]
SHAPES = [
    "Hi, {guest} here. I'd like a {room} room for {nights} from {date}.",
    "Booking request: {nights}, {room} room, arriving {date}. Name: {guest}.",
    "Please reserve a {room} room for {guest}, check-in {date}, staying {nights}.",
    "{guest} - arriving {date} - {room} room - {nights}",
    "Could you hold a {room} room from {date}? It's for {nights}. Thanks, {guest}",
    "We arrive on {date} and need a {room} room for {nights}. Booked by {guest}.",
]
INSTRUCTION = "Extract guest, arrival date, nights and room type. Answer as: guest=...; arrive=...; nights=N; room=..."


def example(rng: random.Random) -> dict:
    guest = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    month, day = rng.choice(MONTHS), rng.randint(1, 28)
    date = f"{day} {month}" if rng.random() < 0.5 else f"{month} {day}"
    n = rng.randint(1, 7)
    count = WORDS[n - 1] if rng.random() < 0.4 else str(n)
    nights = f"{count} night" + ("s" if n > 1 else "")
    room = rng.choice(ROOMS)
    message = rng.choice(SHAPES).format(guest=guest, date=date, nights=nights, room=room)
    return {"instruction": INSTRUCTION, "input": message,
            "output": f"guest={guest}; arrive={date}; nights={n}; room={room}"}
