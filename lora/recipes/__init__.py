"""The recipes: whole training runs, each a module with a settings dataclass and ``main(argv) -> metrics``.

One implementation, two doors: ``lora train NAME [--config FILE.yaml] key=value ...`` (installed with the
package, works from any folder) and, in a clone, ``python recipes/NAME.py ...``, a thin script that calls the same
``main``.

- ``sft.py``: instruction tuning, held-out exact match before and after;
- ``classify.py``: sequence classification with LoRA and a trainable ``score`` head;
- ``pretrain.py``: continued pre-training on plain text, perplexity before and after;
- ``dpo.py``: preference tuning (DPO), the reference being the same model with its adapters off;
- ``grpo.py``: fine-tuning on a reward (GRPO) a program checks, the same one-copy reference.

``data/`` is the bundled example data the recipes train on by default (``data/README.md`` says where it comes
from); it ships with the package. A new recipe is a module here with a ``main(argv)``: ``lora train`` finds it by
its file name.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType

DATA = Path(__file__).parent / "data"


def names() -> list[str]:
    """The recipes ``lora train`` knows: the public modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.ispkg and not m.name.startswith("_"))


def load(recipe: str) -> ModuleType:
    """The module of recipe ``recipe``: a name from :func:`names`, or the path of a ``.py`` file of your own that
    defines ``main(argv)`` as these do.

    Raises:
        ValueError: no such recipe (the message lists them), or a file without ``main``.
    """
    if recipe.endswith(".py"):
        path = Path(recipe)
        if not path.is_file():
            raise ValueError(f"recipe file {path} does not exist; give a recipe name ({', '.join(names())}) or the "
                             f"path of a .py file that defines main(argv)")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    elif recipe in names():
        module = importlib.import_module(f"{__name__}.{recipe}")
    else:
        raise ValueError(f"no recipe {recipe!r}; the recipes are {', '.join(names())} (or the path of a .py file "
                         f"that defines main(argv)). `lora train NAME --help` lists a recipe's settings")
    if not callable(getattr(module, "main", None)):
        raise ValueError(f"recipe {recipe} defines no main(argv); a recipe is a module with main(argv) -> metrics, "
                         f"as lora/recipes/sft.py")
    return module


def summary(module: ModuleType) -> str:
    """A recipe's one-line description: the first line of its docstring."""
    return ((module.__doc__ or "").strip().splitlines() or [""])[0]


__all__ = ["DATA", "names", "load", "summary"]
