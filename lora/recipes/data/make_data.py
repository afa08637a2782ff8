"""Writes the bundled example data in this folder. Seeded: running it again gives the same files.

    python lora/recipes/data/make_data.py

- extract_{train,eval}.jsonl  Alpaca format: pull one field (order number, customer name or city) out of a short
                              customer message. Answers are exact strings, so accuracy is exact match.
- spam_{train,eval}.jsonl     text/label: short SMS messages labelled "spam" or "ham".
- notes_{train,eval}.jsonl    plain text: short support-desk notes, for continued pre-training.
- prefs_{train,eval}.jsonl    preference pairs (prompt, chosen, rejected) for DPO: the requested field of a customer
                              message is chosen, another field of the same message rejected.
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

FIRST = ["Anna", "Ben", "Chloe", "David", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemal", "Lena",
         "Marco", "Nadia", "Oscar", "Priya", "Quinn", "Rosa", "Sven", "Tara", "Umar", "Vera", "Wei", "Yara", "Zoe"]
LAST = ["Smith", "Garcia", "Novak", "Tanaka", "Okafor", "Larsen", "Rossi", "Dubois", "Kowalski", "Silva", "Meyer",
        "Haddad", "Nguyen", "Fischer", "Moreau", "Jensen", "Costa", "Weber", "Ivanova", "Brown"]
CITIES = ["Lisbon", "Oslo", "Denver", "Osaka", "Nairobi", "Krakow", "Lyon", "Porto", "Austin", "Leeds", "Hamburg",
          "Turin", "Quito", "Perth", "Dublin", "Seville", "Tampere", "Ghent", "Halifax", "Cusco"]
PRODUCTS = ["blender", "desk lamp", "rain jacket", "headphones", "coffee grinder", "backpack", "kettle", "monitor",
            "yoga mat", "phone case", "bike helmet", "toaster"]
ISSUES = ["arrived damaged", "has not arrived yet", "is the wrong colour", "stopped working after a week",
          "was charged twice", "is missing a part"]
MESSAGES = [
    "Hi, this is {name} from {city}. My {product} (order {order}) {issue}. Can you help?",
    "Order {order}: the {product} {issue}. Please call me back. {name}, {city}",
    "Hello! I ordered a {product} last week, order number {order}, and it {issue}. Regards, {name} ({city})",
    "{name} here. Writing from {city} about order {order} - the {product} {issue}.",
    "Dear support, my {product} {issue}. The order is {order}. Thanks, {name}, {city}.",
]
FIELDS = {"order": "order number", "name": "customer name", "city": "city"}

SPAM = [
    "WINNER!! You have been selected for a {money} prize. Call {phone} now to claim before {day}!",
    "URGENT: your account will be closed. Verify your details at {site} within 24 hours.",
    "Congratulations! You won a free {thing}. Text CLAIM to {short} (cost {pence}p/msg).",
    "Cheap loans approved instantly, no credit check! Reply YES to {short} for {money} today.",
    "Your parcel is waiting. Pay the {pence}p customs fee at {site} to release it.",
    "FREE entry to win {money} cash! Send WIN to {short}. T&Cs apply, 18+ only.",
]
HAM = [
    "Hey, are we still on for {meal} at {time}?",
    "Running late, be there in {minutes} minutes.",
    "Can you pick up some {food} on your way home?",
    "Thanks for {meal} yesterday, it was lovely.",
    "Did you see the match on {day}? Unbelievable ending.",
    "Meeting moved to {time}, same room as last week.",
    "Happy birthday! Hope you have a great {day}.",
    "I left my {thing} at yours, can I grab it {day}?",
]
FILL = {
    "money": ["£500", "£1000", "$2,000", "£250", "€800"], "phone": ["09061 743 812", "0871 221 5500", "09050 001 234"],
    "day": ["Friday", "Monday", "Sunday", "tomorrow", "the weekend"], "site": ["secure-verify.co", "pay-parcel.net"],
    "thing": ["iPhone", "holiday", "gift card", "umbrella", "charger", "jacket"], "short": ["80082", "87121", "69669"],
    "pence": ["150", "99", "250"], "meal": ["dinner", "lunch", "brunch", "coffee"], "time": ["7", "half six", "noon"],
    "minutes": ["5", "10", "20"], "food": ["milk", "bread", "eggs", "pasta"],
}


def order_number(rng: random.Random) -> str:
    return f"{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}-{rng.randint(10000, 99999)}"


def extraction_example(rng: random.Random) -> dict:
    values = {"order": order_number(rng), "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
              "city": rng.choice(CITIES)}
    message = rng.choice(MESSAGES).format(product=rng.choice(PRODUCTS), issue=rng.choice(ISSUES), **values)
    field = rng.choice(list(FIELDS))
    return {"instruction": f"Extract the {FIELDS[field]} from this customer message. Reply with the "
                           f"{FIELDS[field]} only.",
            "input": message, "output": values[field]}


def preference_example(rng: random.Random) -> dict:
    """A prompt whose right answer is one field of the message; the rejected answer is another of its fields."""
    values = {"order": order_number(rng), "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
              "city": rng.choice(CITIES)}
    message = rng.choice(MESSAGES).format(product=rng.choice(PRODUCTS), issue=rng.choice(ISSUES), **values)
    field, wrong = rng.sample(list(FIELDS), 2)
    return {"prompt": f"Extract the {FIELDS[field]} from this customer message. Reply with the {FIELDS[field]} "
                      f"only.\n\n{message}",
            "chosen": values[field], "rejected": values[wrong]}


def fill(template: str, rng: random.Random) -> str:
    return template.format(**{k: rng.choice(v) for k, v in FILL.items()})


def write(name: str, rows: list[dict]) -> None:
    (HERE / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main() -> None:
    rng = random.Random(1234)
    extraction = [extraction_example(rng) for _ in range(1100)]
    write("extract_train.jsonl", extraction[:1000])
    write("extract_eval.jsonl", extraction[1000:])

    sms = [{"text": fill(rng.choice(SPAM), rng), "label": "spam"} for _ in range(300)]
    sms += [{"text": fill(rng.choice(HAM), rng), "label": "ham"} for _ in range(700)]  # spam is the minority
    rng.shuffle(sms)
    write("spam_train.jsonl", sms[:800])
    write("spam_eval.jsonl", sms[800:])

    notes = []
    for _ in range(440):
        ex = extraction_example(rng)
        notes.append({"text": f"Ticket: {ex['input']} Resolution: replacement sent to the customer."})
    write("notes_train.jsonl", notes[:400])
    write("notes_eval.jsonl", notes[400:])

    prefs = random.Random(5678)  # its own stream: the files above stay as they were
    pairs = [preference_example(prefs) for _ in range(500)]
    write("prefs_train.jsonl", pairs[:400])
    write("prefs_eval.jsonl", pairs[400:])


if __name__ == "__main__":
    main()
