"""Nothing in the package can unpickle (run code from) a file: no pickle import, no torch.load without
weights_only=True, no np.load(allow_pickle=True), no trust_remote_code=True, no torch.save (a pickle writer)."""

import ast
from pathlib import Path

import pytest

import lora

PACKAGE = Path(lora.__file__).resolve().parent
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _name(node: ast.AST) -> str:
    """Dotted name of a call's function: ``torch.load``, ``np.load``, ``load``."""
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def findings(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that could unpickle, run remote code or write a pickle."""
    tree = ast.parse(source, filename)
    aliases = {"torch": {"torch"}, "numpy": {"numpy"}}  # module -> the names it is bound to
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                if top in aliases:
                    aliases[top].add(a.asname or a.name)
    found = []
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where}: import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLERS]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PICKLERS:
                found.append(f"{where}: from {node.module} import ...")
            if module == "torch" and any(a.name in ("load", "save") for a in node.names):
                found.append(f"{where}: from torch import load/save")
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            owner, _, attr = name.rpartition(".")
            keywords = {k.arg: k.value for k in node.keywords if k.arg}
            if owner in aliases["torch"] and attr == "load" and not _is_true(keywords.get("weights_only")):
                found.append(f"{where}: {name}(...) without weights_only=True")
            if owner in aliases["torch"] and attr == "save":
                found.append(f"{where}: {name}(...) writes a pickle")
            allow_pickle = keywords.get("allow_pickle")
            if owner in aliases["numpy"] | {"np"} and attr == "load" and allow_pickle is not None and not (
                    isinstance(allow_pickle, ast.Constant) and allow_pickle.value is False):
                found.append(f"{where}: {name}(..., allow_pickle=...) may unpickle")
            if attr in ("read_pickle", "loads") and owner in PICKLERS | {"pd", "pandas"}:
                found.append(f"{where}: {name}(...) unpickles")
            if _is_true(keywords.get("trust_remote_code")):
                found.append(f"{where}: trust_remote_code=True")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults \
                + node.args.kw_defaults
            for arg, default in zip(args, defaults):
                if arg.arg == "trust_remote_code" and _is_true(default):
                    found.append(f"{where}: {node.name}(trust_remote_code=True) by default")
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and _is_true(value):
                    found.append(f"{where}: {{'trust_remote_code': True}}")
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))  # the wings (lora/data, lora/train, lora/export) included


def _source_name(path: Path) -> str:
    return path.relative_to(PACKAGE).as_posix()


def test_the_package_is_scanned():
    assert {"adapter_io.py", "models.py", "train/trainer.py", "train/checkpoint.py", "export/gguf_writer.py",
            "data/sources.py"} <= {_source_name(p) for p in SOURCES}


@pytest.mark.parametrize("path", SOURCES, ids=[_source_name(p) for p in SOURCES])
def test_no_way_to_unpickle_or_run_remote_code(path):
    assert findings(path.read_text(), _source_name(path)) == []


@pytest.mark.parametrize("source", [
    "import pickle",
    "import cloudpickle as cp",
    "from pickle import loads",
    "import torch\nstate = torch.load(path)",
    "import torch as T\nstate = T.load(path, weights_only=False)",
    "from torch import load",
    "import torch\ntorch.save(obj, path)",
    "import numpy as np\na = np.load(path, allow_pickle=True)",
    "model = AutoModel.from_pretrained(path, trust_remote_code=True)",
    "def load_model(path, trust_remote_code=True): ...",
    "def load_model(path, *, trust_remote_code=True): ...",
    "kwargs = {'trust_remote_code': True}",
])
def test_the_scanner_finds_each_kind(source):
    assert findings(source), source


@pytest.mark.parametrize("source", [
    "import torch\nstate = torch.load(path, weights_only=True)",
    "import numpy as np\na = np.load(path)",
    "model = AutoModel.from_pretrained(path, trust_remote_code=False)",
    "from safetensors.torch import load_file",
])
def test_the_scanner_accepts_safe_code(source):
    assert findings(source) == []
