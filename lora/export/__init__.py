"""The export wing: a merged Hugging Face folder, GGUF files for llama.cpp and Ollama, the Ollama Modelfile, and the
read-back check every export passes before it replaces an earlier output.

- ``base.py``: the base model's folder and its weights, streamed one tensor at a time with the adapter merged in;
- ``merged.py``: the merged safetensors folder (shards and index);
- ``gguf_arch.py``: llama.cpp's view of a model: families, settings, Q/K row order;
- ``gguf_tokenizer.py``: the tokenizer and chat template in a GGUF file;
- ``gguf_writer.py``: GGUF files, the whole model or the adapter alone;
- ``gguf_reader.py``: a GGUF file read back as a transformers model (through transformers' loader, or our own);
- ``ollama.py``: the Modelfile;
- ``verify.py``: the read-back check (logits of what was written against the base + adapter's);
- ``checked.py``: the exports users call, which write and then check.

A new export target is a writer module that takes a ``check`` callback for its temporary output, and an entry in
``checked.py`` that hands it the read-back check.
"""

from .base import BaseWeights, merged_tensors, resolve_base_folder
from .checked import export_base_and_adapter_gguf, export_gguf, export_merged
from .gguf_arch import permute_for_llama_cpp, unpermute_from_llama_cpp
from .gguf_reader import read_gguf_model, read_gguf_with_config
from .gguf_tokenizer import llama_cpp_pre_tokenizer
from .gguf_writer import GGUF_DTYPES, check_adapter_gguf, export_adapter_gguf, write_gguf
from .merged import write_merged
from .ollama import ollama_modelfile, write_modelfile
from .verify import verify_export

__all__ = ["export_merged", "export_gguf", "export_adapter_gguf", "export_base_and_adapter_gguf", "write_merged",
           "write_gguf", "check_adapter_gguf", "write_modelfile", "ollama_modelfile", "verify_export",
           "resolve_base_folder", "BaseWeights", "merged_tensors", "permute_for_llama_cpp",
           "unpermute_from_llama_cpp", "read_gguf_model", "read_gguf_with_config", "llama_cpp_pre_tokenizer",
           "GGUF_DTYPES"]
