"""The data wing: records where people keep them -> token ids the trainer packs into rows.

- ``sources.py``: reading records from JSONL, JSON arrays, CSV/TSV, Parquet, text files, Arrow folders, folders and
  globs of them, ``datasets`` objects and lists, each checked as it is read, with ``file:line`` (or row) errors;
- ``formats.py``: which keys make which kind of record (Alpaca, chat with tool calling, ShareGPT, ...), how one is
  checked, the conversation it stands for, and the ``columns=`` mapping;
- ``chat.py``: conversations -> token ids through the chat template, and the mask that keeps the loss on answers
  (one conversation at a time: the reference, and what generation uses);
- ``encode.py``: the same for many conversations and texts at once, through the fast tokenizer;
- ``storage.py``: tokenized examples in flat int32 arrays, saved and memory-mapped;
- ``cache.py``: the on-disk cache of tokenized sets, keyed by content, tokenizer, template and settings;
- ``dataset.py``: :func:`load_dataset` (tokenized examples, the over-long policy, text windows, stats) and
  :func:`prompts_and_answers` (for exact match);
- ``preferences.py``: preference pairs for DPO;
- ``prompts.py``: prompts (and the columns reward functions read) for GRPO;
- ``packing.py``: packing examples into rows, padding and stacking them into batches;
- ``report.py``: what ``lora data inspect`` shows: the detected format, stats, examples with trained tokens marked.

A new source goes in ``sources.py``; a new record shape in ``formats.py`` (and its rendering in ``chat.py``).
"""

from .chat import IGNORE, render_chat, special_prefix, tokenize_chat
from .dataset import OVERLONG, DataStats, load_dataset, prompts_and_answers
from .formats import FORMATS, detect_format, parse_columns, to_messages
from .packing import collate, example_lengths, join_rows, model_inputs, pack
from .preferences import load_preferences
from .prompts import load_prompts
from .report import inspect_data
from .sources import MAX_LINE_BYTES, open_source, read_jsonl
from .storage import Example, Examples

__all__ = ["read_jsonl", "open_source", "load_dataset", "load_preferences", "load_prompts", "prompts_and_answers",
           "pack", "example_lengths", "join_rows", "collate", "model_inputs", "detect_format", "to_messages",
           "parse_columns", "tokenize_chat", "render_chat", "special_prefix", "inspect_data", "DataStats", "Examples",
           "Example", "FORMATS", "OVERLONG", "IGNORE", "MAX_LINE_BYTES"]
