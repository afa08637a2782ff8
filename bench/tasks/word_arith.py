"""word_arith: one- or two-step word problems with small numbers and a single integer answer.

Six problem shapes (add then take away, groups of, sharing equally, difference, change from a payment, ages), so
the model has to pick the operation from the wording; every answer is a non-negative integer.
"""

from __future__ import annotations

import random

NAMES = ["Ana", "Bilal", "Chen", "Dara", "Eli", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kira", "Luis", "Mina",
         "Nour", "Oscar", "Pia"]
ITEMS = ["stickers", "marbles", "apples", "pencils", "stamps", "shells", "cards", "coins", "books", "eggs"]
QUESTION = "Answer with the number only."


def example(rng: random.Random) -> dict:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    shape = rng.randrange(6)
    if shape == 0:
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        c = rng.randint(1, a + b)
        text = f"{name} has {a} {item}, gets {b} more and gives {c} to {other}. How many {item} does {name} have now?"
        answer = a + b - c
    elif shape == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text = f"{name} buys {a} boxes of {item} with {b} in each box. How many {item} is that?"
        answer = a * b
    elif shape == 2:
        b, q = rng.randint(2, 9), rng.randint(2, 12)
        text = f"{name} shares {b * q} {item} equally among {b} friends. How many {item} does each friend get?"
        answer = q
    elif shape == 3:
        a, b = rng.sample(range(5, 90), 2)
        more, less = max(a, b), min(a, b)
        first, second = (name, other) if a > b else (other, name)
        counts = {name: a, other: b}
        text = (f"{name} has {counts[name]} {item} and {other} has {counts[other]}. How many more {item} does "
                f"{first} have than {second}?")
        answer = more - less
    elif shape == 4:
        price, count = rng.randint(2, 15), rng.randint(1, 6)
        paid = rng.choice([p for p in (20, 50, 100) if p >= price * count])
        text = f"{name} buys {count} tickets at {price} dollars each and pays with {paid} dollars. What is the change?"
        answer = paid - price * count
    else:
        age, gap, years = rng.randint(4, 40), rng.randint(1, 30), rng.randint(1, 10)
        text = f"{name} is {age}. {other} is {gap} years older. How old will {other} be in {years} years?"
        answer = age + gap + years
    return {"prompt": f"{text} {QUESTION}", "completion": str(answer)}
