"""Continued pre-training with LoRA on plain text: the same run as ``lora train pretrain``.

    python recipes/pretrain.py [--config recipes/configs/pretrain.yaml] [key=value ...]     # --help lists the settings

The code is lora/recipes/pretrain.py, installed with the package; this script is the door to it from a clone.
"""

from lora.recipe import run
from lora.recipes.pretrain import Pretrain, main  # noqa: F401  (Pretrain: its settings, which tests read from here)

if __name__ == "__main__":
    run(main)
