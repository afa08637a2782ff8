"""Instruction tuning (SFT) with LoRA: the same run as ``lora train sft``.

    python recipes/sft.py [--config recipes/configs/sft.yaml] [key=value ...]     # --help lists the settings

The code is lora/recipes/sft.py, installed with the package; this script is the door to it from a clone.
"""

from lora.recipe import run
from lora.recipes.sft import SFT, main  # noqa: F401  (SFT: its settings, which tests read from here)

if __name__ == "__main__":
    run(main)
