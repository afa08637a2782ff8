"""The package's layout (issue 21): every import points down the layers, nothing imports in a circle, and the
README's Python examples run.

The layers, lowest first: the adapter core at the top of ``lora/``, then the data wing, generation, the training and
export wings (siblings: neither imports the other), the recipes' shared code (beside ``lora eval`` and ``lora info``),
the recipes themselves (``lora/recipes/``), and the command line. Imports are read
from the source (every ``import`` statement, those inside functions included, those under ``TYPE_CHECKING``
left out), since importing any module of the package runs ``lora/__init__.py``, which pulls in everything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora"

CORE = ("lora.atomic", "lora.errors", "lora.config", "lora.layers", "lora.inject", "lora.adapter_io", "lora.merge",
        "lora.combine", "lora.models", "lora.model_card", "lora.tokens")
# the recipes' shared code, `lora eval` and `lora info` stand side by side; the recipes (lora/recipes/) above them
LAYERS = [CORE, ("lora.data",), ("lora.generate",), ("lora.train", "lora.export"),
          ("lora.recipe", "lora.evaluation", "lora.info"), ("lora.recipes",), ("lora.cli",)]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the wing or module that stands in it) of a module of the package."""
    for index, members in enumerate(LAYERS):
        for member in members:
            if module == member or module.startswith(member + "."):
                return index, member
    raise AssertionError(f"{module} stands in no layer of tests/test_layout.py; add it where it belongs")


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(module: str) -> set[str]:
    """The package's modules that ``module`` imports, resolved (``from . import x`` names submodule ``x``)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "lora")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "lora":
                continue
            for alias in node.names:  # `from . import run_state`: the submodule itself
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {m for m in found if m in MODULES and m != module}


def test_every_module_stands_in_a_layer_and_imports_only_downwards():
    wrong = []
    for module in MODULES:
        if module == "lora":  # the public API re-exports every layer
            continue
        mine, my_wing = layer_of(module)
        for target in imports_of(module):
            theirs, their_wing = layer_of(target)
            if theirs > mine or (theirs == mine and their_wing != my_wing and mine != 0):
                wrong.append(f"{module} (layer {mine}, {my_wing}) imports {target} (layer {theirs}, {their_wing})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circles():
    graph = {m: imports_of(m) for m in MODULES}
    # a package's __init__ hands on its modules' names: an edge from a module to its own package's __init__ would
    # be the circle to find, so those stay in; the edges from the __init__ down are the package's own
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module)


def test_the_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check above is not vacuous: a data module that imported the trainer would be reported."""
    fake = tmp_path / "lora" / "data" / "upward.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..train import Trainer\n")
    monkeypatch.setitem(MODULES, "lora.data.upward", fake)
    assert imports_of("lora.data.upward") == {"lora.train"}
    with pytest.raises(AssertionError, match=r"lora.data.upward \(layer 1, lora.data\) imports lora.train"):
        test_every_module_stands_in_a_layer_and_imports_only_downwards()


def test_each_wing_says_what_it_does():
    for wing in ("data", "train", "export", "recipes"):
        doc = ast.get_docstring(ast.parse((PACKAGE / wing / "__init__.py").read_text()))
        assert doc, f"lora/{wing}/__init__.py has no docstring"
        files = {p.name for p in (PACKAGE / wing).glob("*.py")} - {"__init__.py"}
        assert all(f"``{name}``" in doc for name in files), (wing, sorted(f for f in files if f"``{f}``" not in doc))


# -- the README's Python examples, with tiny stand-ins for the model and data -----------------------------------
def readme_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_the_readme_shows_python_examples():
    assert len(readme_examples()) >= 4


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_python_example_runs(index, tmp_path, monkeypatch):
    import lora
    from conftest import make_char_tokenizer, make_llama_for

    monkeypatch.chdir(tmp_path)
    tokenizer = make_char_tokenizer()

    def tiny_model(name="smollm2-135m", **kwargs):  # stands in for the embedded model: no conversion, no download
        return make_llama_for(tokenizer), tokenizer

    monkeypatch.setattr(lora, "load_model", tiny_model)
    rows = [{"instruction": "Reverse", "input": w, "output": w[::-1]} for w in ("abc", "hello", "lora", "tiny")]
    for name in ("my_train.jsonl", "my_eval.jsonl"):
        Path(name).write_text("".join(__import__("json").dumps(r) + "\n" for r in rows * 3))
    model = make_llama_for(tokenizer)
    namespace = {"lora": lora, "model": model, "base_model": make_llama_for(tokenizer), "tokenizer": tokenizer,
                 "prompts": ["hi", "a longer prompt", "x"], "ids": tokenizer(["abc", "def", "ghi"])["input_ids"]}
    code = readme_examples()[index]
    if "row_adapters" in code:  # the example runs on a model that holds adapters "a" and "b"
        for name in ("a", "b"):
            lora.inject(model, lora.LoraConfig(r=2, alpha=4), adapter=name)
        import torch

        namespace["ids"] = torch.tensor(namespace["ids"])
    code = code.replace("max_new_tokens=64", "max_new_tokens=4").replace("epochs=1,", "max_steps=1,")
    exec(compile(code, f"README.md example {index}", "exec"), namespace)
