"""A second instruction task, unlike the bundled one, for checking training defaults (early stopping) beyond it.

    .venv/bin/python bench/make_invoice_task.py --out /tmp/invoice     # train.jsonl (1,000) + eval.jsonl (100)
    .venv/bin/python recipes/sft.py train_file=/tmp/invoice/train.jsonl eval_file=/tmp/invoice/eval.jsonl

Invoice notes in four sentence shapes; each example asks for one of four fields (invoice number, company, amount
due, due date) in the ``prompt``/``completion`` format. Seeded: the same files every time.
"""

import argparse
import json
import random
from pathlib import Path

COMPANIES = ["Northwind Traders", "Blue Harbor Logistics", "Cedar & Pine Ltd", "Orbital Foods", "Kestrel Analytics",
             "Maple Street Bakery", "Quantum Tiles GmbH", "Silverline Media", "Riverbend Farms", "Atlas Print Co"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SHAPES = [
    "Invoice {number} from {company} for {amount} is due on {date}.",
    "Please pay {amount} to {company} by {date} (ref. {number}).",
    "{company} sent invoice {number}; the balance of {amount} must be settled before {date}.",
    "Reminder: {number} ({company}) - {amount} outstanding, payment date {date}.",
]
FIELDS = {"number": "invoice number", "company": "company name", "amount": "amount due", "date": "due date"}


def example(rng: random.Random) -> dict:
    values = {"number": f"INV-{rng.randint(10000, 99999)}", "company": rng.choice(COMPANIES),
              "amount": f"${rng.randint(20, 9999):,}.{rng.randint(0, 99):02d}",
              "date": f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2025, 2027)}"}
    field = rng.choice(list(FIELDS))
    note = rng.choice(SHAPES).format(**values)
    return {"prompt": f"Extract the {FIELDS[field]} from this invoice note. Reply with the {FIELDS[field]} only."
                      f"\n\n{note}", "completion": values[field]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/invoice")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, count in (("train.jsonl", 1000), ("eval.jsonl", 100)):
        (out / name).write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(count)))
    print(f"wrote {out}/train.jsonl (1000) and {out}/eval.jsonl (100)")


if __name__ == "__main__":
    main()
