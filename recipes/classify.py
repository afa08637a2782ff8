"""Sequence classification with LoRA and a trainable head: the same run as ``lora train classify``.

    python recipes/classify.py [--config recipes/configs/classify.yaml] [key=value ...]     # --help lists the settings

The code is lora/recipes/classify.py, installed with the package; this script is the door to it from a clone.
"""

from lora.recipe import run
from lora.recipes.classify import Classify, main  # noqa: F401  (Classify: its settings, which tests read from here)

if __name__ == "__main__":
    run(main)
