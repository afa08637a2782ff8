"""Preference tuning (DPO) with LoRA: the same run as ``lora train dpo``.

    python recipes/dpo.py [--config recipes/configs/dpo.yaml] [key=value ...]     # --help lists the settings

The code is lora/recipes/dpo.py, installed with the package; this script is the door to it from a clone.
"""

from lora.recipe import run
from lora.recipes.dpo import DPO, main  # noqa: F401  (DPO: its settings, which tests read from here)

if __name__ == "__main__":
    run(main)
