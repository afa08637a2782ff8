"""Writes the prompts of the GRPO recipe in this folder. Seeded: running it again gives the same files.

    python lora/recipes/data/make_grpo_data.py

- sums_{train,eval}.jsonl  "What is 17 + 8? Reply with the number only." with the sum in the ``answer`` column: the
                           recipe's default task, checked by ``number_match`` (the reply's last number). The
                           embedded SmolLM2-135M gets about a quarter of them right before training.
- json_{train,eval}.jsonl  the customer messages of ``make_data.py``, asked for the customer's name and city as
                           JSON; the ``answer`` column holds the JSON object (``json_match``, and ``json_parses`` for
                           JSON alone). The second task the recipe's defaults were chosen on.
"""

import json
import random
from pathlib import Path

from make_data import CITIES, FIRST, ISSUES, LAST, MESSAGES, PRODUCTS, order_number, write

HERE = Path(__file__).parent


def sum_prompt(rng: random.Random) -> dict:
    a, b = rng.randint(1, 30), rng.randint(1, 30)
    return {"prompt": f"What is {a} + {b}? Reply with the number only.", "answer": str(a + b)}


def json_prompt(rng: random.Random) -> dict:
    values = {"order": order_number(rng), "name": f"{rng.choice(FIRST)} {rng.choice(LAST)}",
              "city": rng.choice(CITIES)}
    message = rng.choice(MESSAGES).format(product=rng.choice(PRODUCTS), issue=rng.choice(ISSUES), **values)
    return {"prompt": f"Extract the customer name and city from this customer message. Reply with JSON only, like "
                      f'{{"name": "...", "city": "..."}}.\n\n{message}',
            "answer": json.dumps({"name": values["name"], "city": values["city"]})}


def main() -> None:
    rng = random.Random(2468)  # a stream of its own: make_data.py's files stay as they are
    held_out: dict[str, dict] = {}
    while len(held_out) < 100:  # 100 distinct questions, of the 900 there are (a and b from 1 to 30)
        row = sum_prompt(rng)
        held_out.setdefault(row["prompt"], row)
    train = []
    while len(train) < 1000:  # none of them seen in training
        row = sum_prompt(rng)
        if row["prompt"] not in held_out:
            train.append(row)
    write("sums_train.jsonl", train)
    write("sums_eval.jsonl", list(held_out.values()))

    rows = [json_prompt(rng) for _ in range(600)]
    write("json_train.jsonl", rows[:500])
    write("json_eval.jsonl", rows[500:])


if __name__ == "__main__":
    main()
