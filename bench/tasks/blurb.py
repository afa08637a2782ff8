"""product_blurb: a one-sentence product description written from a spec line (free text, scored by loss).

The sentence takes one of four phrasings chosen at random, so exact match cannot reach 100%; what training can teach
is to use every field of the spec, which the held-out loss (and the suite's word-overlap score) measure.
"""

from __future__ import annotations

import random

NAMES = ["Alder", "Brook", "Cinder", "Dune", "Ember", "Fjord", "Grove", "Haven", "Isle", "Juniper", "Kestrel",
         "Lumen", "Moss", "Nimbus", "Onyx", "Pebble"]
TYPES = ["desk lamp", "backpack", "water bottle", "armchair", "wall clock", "kettle", "rug", "notebook", "speaker",
         "planter"]
MATERIALS = ["oak", "recycled plastic", "steel", "linen", "ceramic", "walnut", "wool", "bamboo", "leather", "glass"]
COLOURS = ["green", "charcoal", "sand", "navy", "terracotta", "white", "mustard", "grey"]
FEATURES = ["a dimmable light", "a lifetime warranty", "a magnetic lid", "hidden storage", "a washable cover",
            "a quiet motor", "a folding frame", "a built-in handle", "a non-slip base", "a two-year guarantee"]
PHRASINGS = [
    "The {name} is a {colour} {type} made of {material}, with {feature}.",
    "Meet the {name}: a {type} in {colour} {material} that comes with {feature}.",
    "Made of {material} and finished in {colour}, the {name} {type} has {feature}.",
    "With {feature}, the {colour} {name} {type} is built from {material}.",
]
INSTRUCTION = "Write a one-sentence product description from this spec."


def example(rng: random.Random) -> dict:
    spec = {"name": rng.choice(NAMES), "type": rng.choice(TYPES), "material": rng.choice(MATERIALS),
            "colour": rng.choice(COLOURS), "feature": rng.choice(FEATURES)}
    line = "; ".join(f"{k}: {v}" for k, v in spec.items())
    return {"instruction": INSTRUCTION, "input": line, "output": rng.choice(PHRASINGS).format(**spec)}
