"""The on-disk cache of tokenized sets, so that a second identical run reads its data in a moment.

An entry is keyed by everything the tokens depend on: the source's content (the bytes of its files, or a
``datasets.Dataset``'s own fingerprint), the tokenizer (its full ``tokenizer.json`` serialization and special
tokens), its chat template, the loader's settings, and the source code of this wing (a changed loader never reads
an old entry). Entries live in ``$LORA_CACHE_DIR/data`` (default ``~/.cache/lora/data``), are written atomically
(a half-written entry is never read) and read memory-mapped. Nothing evicts them: delete the folder to reclaim the
space.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
from pathlib import Path

from ..atomic import atomic_dir
from ..models import cache_dir
from .storage import Examples


def cache_folder(cache: bool | str | os.PathLike | None) -> Path | None:
    """Where entries go: ``cache=True`` the default folder, a path that folder, ``False``/None no cache."""
    if cache is None or cache is False:
        return None
    if cache is True:
        return cache_dir() / "data"
    return Path(cache).expanduser()


def _tokenizing_code() -> list[str]:
    """The modules whose code decides the tokens of a set: dataset.py (which reads, formats and tokenizes it) and
    every module of this package it imports, directly or through another, found from the imports themselves so
    that a new module cannot be missed."""
    here, todo, found = Path(__file__).parent, ["dataset"], set()
    while todo:
        name = todo.pop()
        if name in found or not (here / f"{name}.py").is_file():
            continue
        found.add(name)
        for node in ast.walk(ast.parse((here / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import ... / from . import x
                todo += [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
    return sorted(f"{name}.py" for name in found)


@functools.cache
def _code_version() -> str:
    """A hash of :func:`_tokenizing_code`: a change to any of it makes earlier entries unreadable."""
    digest = hashlib.sha256()
    for name in _tokenizing_code():
        digest.update(name.encode() + b"\0" + (Path(__file__).parent / name).read_bytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str | None:
    """What a fast tokenizer turns text into, as a hash (None for a slow tokenizer: no cache for it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    digest = hashlib.sha256(backend.to_str().encode())
    template = getattr(tokenizer, "chat_template", None)
    digest.update(json.dumps([type(tokenizer).__name__, template, tokenizer.special_tokens_map,
                              tokenizer.eos_token_id, tokenizer.pad_token_id], sort_keys=True, default=str).encode())
    return digest.hexdigest()


def entry_key(source_fingerprint: str, tokenizer_fp: str, settings: dict) -> str:
    blob = json.dumps([_code_version(), source_fingerprint, tokenizer_fp, settings], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def read_entry(folder: Path, key: str) -> tuple[Examples, dict] | None:
    """The cached set and its meta, or None (absent, or unreadable: it is then written again)."""
    entry = folder / key
    if not (entry / "meta.json").is_file():
        return None
    try:
        return Examples.load(entry)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_entry(folder: Path, key: str, examples: Examples, meta: dict) -> Examples:
    """Save ``examples`` under ``key`` and hand back the saved copy, memory-mapped (the in-memory arrays can go).

    A folder that cannot be written (read-only, full) leaves the cache out: the examples are returned as they are.
    """
    try:
        with atomic_dir(folder / key, owns=lambda name: True) as tmp:
            examples.save(tmp, meta)
    except OSError:
        return examples
    found = read_entry(folder, key)
    return found[0] if found is not None else examples
