"""Fine-tuning on a reward (GRPO) with LoRA: the same run as ``lora train grpo``.

    python recipes/grpo.py [--config recipes/configs/grpo.yaml] [key=value ...]     # --help lists the settings

The code is lora/recipes/grpo.py, installed with the package; this script is the door to it from a clone.
"""

from lora.recipe import run
from lora.recipes.grpo import GRPO, main  # noqa: F401  (GRPO: its settings, which tests read from here)

if __name__ == "__main__":
    run(main)
