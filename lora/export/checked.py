"""Exports that check themselves: each writes through its writer, then reads what it wrote back (:mod:`.verify`)
and compares its logits with the base + adapter's, before the new output replaces an earlier one.

The writers (:mod:`.merged`, :mod:`.gguf_writer`) know nothing of the check: they call the ``check`` they are given
on their temporary output. This module is the one caller that hands them :func:`.verify.verify_export`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..atomic import atomic_file
from .base import resolve_base_folder
from .gguf_writer import check_adapter_gguf, export_adapter_gguf, write_gguf
from .merged import DEFAULT_SHARD_BYTES, write_merged
from .verify import verify_export


def export_merged(model: str | os.PathLike, adapter: str | os.PathLike | None, out: str | os.PathLike,
                  max_shard_bytes: int = DEFAULT_SHARD_BYTES, check_base: bool = True, verify: bool = True) -> Path:
    """A merged Hugging Face folder (:func:`lora.export.merged.write_merged`), checked before it replaces ``out``.

    Args:
        verify: Before the new folder replaces ``out``, compare its logits with the adapter model's and print the
            max |dlogit| (:func:`lora.export.verify.verify_export`). This loads the model twice, one copy after the
            other, in float32: it needs about 4 bytes per parameter, far more than the merge itself.
        model, adapter, out, max_shard_bytes, check_base: as :func:`~lora.export.merged.write_merged` takes them.

    Raises:
        ValueError: the base is not a usable folder, or the adapter does not belong to it (nothing is written), or
            the check failed (``out`` is left as it was).
    """
    folder = resolve_base_folder(model)
    check = (lambda tmp: print(verify_export(folder, adapter, tmp, name=str(out)), flush=True)) if verify else None
    return write_merged(model, adapter, out, max_shard_bytes, check_base, check=check)


def export_gguf(model: str | os.PathLike, out: str | os.PathLike, adapter: str | os.PathLike | None = None,
                dtype: str = "f16", check_base: bool = True, verify: bool = True) -> Path:
    """A GGUF file for llama.cpp, Ollama and transformers (:func:`lora.export.gguf_writer.write_gguf`), checked
    before it replaces ``out``.

    Args:
        verify: Before the new file replaces ``out``, read it back (:func:`lora.export.read_gguf_model`:
            transformers' GGUF loader, or our own reader for OLMo 2 and Granite), compare its logits with the adapter
            model's and print the max |dlogit|. This loads the model twice, one copy after
            the other, in float32 (about 4 bytes per parameter, twice that while transformers dequantizes the
            file); a failure raises ValueError and leaves ``out`` as it was.
        model, out, adapter, dtype, check_base: as :func:`~lora.export.gguf_writer.write_gguf` takes them.
    """
    folder = resolve_base_folder(model)
    check = (lambda tmp: print(verify_export(folder, adapter, tmp, name=str(out)), flush=True)) if verify else None
    return write_gguf(model, out, adapter, dtype, check_base, check=check)


def export_base_and_adapter_gguf(model: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike,
                                 dtype: str = "f16", check_base: bool = True, verify: bool = True) -> Path:
    """The base alone as GGUF at ``out`` and the adapter beside it as ``<stem>.adapter.gguf`` (Ollama's ``ADAPTER``
    line, ``llama-cli --lora``); returns the adapter file.

    The adapter is checked for what llama.cpp adapters cannot hold before ``out`` is replaced; the base GGUF is
    checked against the base alone, and the adapter GGUF is renamed into place only once the base GGUF with it
    applied gives the adapter model's logits.
    """
    out = Path(out)
    check_adapter_gguf(model, adapter, check_base=check_base)  # before `out` is replaced
    export_gguf(model, out, None, dtype, verify=verify)
    adapter_file = out.with_name(f"{out.stem}.adapter.gguf")
    if not verify:
        return export_adapter_gguf(model, adapter, adapter_file, check_base=check_base)
    with atomic_file(adapter_file) as tmp:
        export_adapter_gguf(model, adapter, tmp, check_base=check_base)
        print(verify_export(model, adapter, out, adapter_gguf=tmp, name=f"{out} + {adapter_file.name}"), flush=True)
    return adapter_file
