"""Reward functions for GRPO: plain Python callables a program can check, a few built in, and the checks that stop a
run with the function's name when one misbehaves.

A reward function is called as ``fn(prompts, completions, **columns)``: the prompts as the data gave them, the
completions as text, and every other column of the prompt records as a list of the same length (``answer=[...]``);
it returns one finite number per completion. Accept ``**kwargs`` to ignore the columns you do not use.

The built-in ones read the reference from the ``answer`` column:

- ``exact_match``: 1 if the completion, stripped, equals the answer, else 0;
- ``number_match``: 1 if the last number in the completion equals the answer as a number (``"The sum is 1,204."``
  matches ``1204``), else 0;
- ``json_parses``: 1 if the completion, stripped, parses as a JSON object or array, else 0;
- ``json_match``: 1 if the completion starts with JSON equal to the answer (a JSON string, or the value itself), else
  0 (text after it does not count against it: add ``json_parses`` for that);
- ``length_penalty``: minus the completion's length in hundreds of characters (weight it, e.g. 0.1).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import re
from collections.abc import Callable, Sequence
from typing import Any

RewardFunction = Callable[..., Sequence[float]]

_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?|[-+]?\.\d+")


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def exact_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1.0 where the completion, stripped, equals the ``answer`` column (as text, stripped), else 0.0."""
    return [float(c.strip() == str(a).strip()) for c, a in zip(completions, answer)]


def number_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1.0 where the last number in the completion equals the ``answer`` column as a number, else 0.0.

    The last one, because a reply that works the sum out (``"13 + 14 = 27"``) ends with its result; thousands
    separators are dropped (``1,204``). Equal means within 1e-6 of the answer's magnitude (at least 1e-6).
    """
    scores = []
    for completion, expected in zip(completions, answer):
        found = _NUMBER.findall(completion)
        got, want = (_number(found[-1]) if found else None), _number(str(expected))
        if want is None:
            raise ValueError(f"number_match: the answer {expected!r} is not a number; give the 'answer' column "
                             f"as a number (12, 3.5, \"1,204\")")
        scores.append(float(got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))))
    return scores


def _json(text: str) -> tuple[bool, Any]:
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return False, None


def _leading_json(text: str) -> tuple[bool, Any]:
    """The JSON value the text starts with (after whitespace), whatever follows it."""
    try:
        return True, json.JSONDecoder().raw_decode(text.lstrip())[0]
    except (json.JSONDecodeError, RecursionError):
        return False, None


def json_parses(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """1.0 where the completion, stripped, is one JSON object or array (a bare number or string does not count:
    nearly any short answer would), else 0.0."""
    return [float(ok and isinstance(value, (dict, list))) for ok, value in map(_json, completions)]


def json_match(prompts: list, completions: list[str], answer: list, **_: Any) -> list[float]:
    """1.0 where the completion starts with JSON equal to the ``answer`` column (a JSON text, or the value itself:
    a dict from a JSONL record), else 0.0. Key order and spacing do not matter, nor text after the JSON: pair it
    with ``json_parses`` to ask for the JSON alone."""
    scores = []
    for completion, expected in zip(completions, answer):
        if isinstance(expected, str):
            ok, expected = _json(expected)
            if not ok:
                raise ValueError(f"json_match: the answer {expected!r} is not JSON; give the 'answer' column as a "
                                 f"JSON value or a JSON text")
        ok, value = _leading_json(completion)
        scores.append(float(ok and value == expected))
    return scores


def length_penalty(prompts: list, completions: list[str], **_: Any) -> list[float]:
    """Minus the completion's length (stripped) in hundreds of characters: -0.5 for 50 characters."""
    return [-len(c.strip()) / 100 for c in completions]


BUILT_IN: dict[str, RewardFunction] = {f.__name__: f for f in (exact_match, number_match, json_parses, json_match,
                                                               length_penalty)}


def reward_name(fn: RewardFunction) -> str:
    """How errors and metrics name a reward function: ``module:function`` (the bare name for a built-in one)."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    if BUILT_IN.get(name) is fn:
        return name
    module = getattr(fn, "__module__", None)
    return f"{module}:{name}" if module else name


def load_reward(spec: str) -> RewardFunction:
    """The reward function ``spec`` names: ``package.module:function`` (importable from the working folder or the
    Python path), or the name of a built-in one (``number_match``).

    Raises:
        ValueError: the module cannot be imported, has no such attribute, or it is not callable.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a reward is named as 'module:function' or a built-in name ({', '.join(BUILT_IN)}), got "
                         f"{spec!r}")
    spec = spec.strip()
    if ":" not in spec:
        if spec in BUILT_IN:
            return BUILT_IN[spec]
        raise ValueError(f"no built-in reward {spec!r}; the built-in ones are {', '.join(BUILT_IN)}, and your own is "
                         f"named as 'module:function' (e.g. my_rewards:is_iso_date)")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward {spec!r}: cannot import {module_name!r} ({e}); run from the folder that holds "
                         f"{module_name.replace('.', '/')}.py, or add that folder to PYTHONPATH") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward {spec!r}: {module_name} has no {attr!r}") from None
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is a {type(fn).__name__}, not a function")
    return fn


class Rewards:
    """Several reward functions and their weights: the score of a completion is their weighted sum.

    Args:
        functions: The reward functions (callables, or names for :func:`load_reward`).
        weights: One weight per function (default: all 1).

    Raises:
        ValueError: no function, or a count of weights that does not match.
    """

    def __init__(self, functions: Sequence[RewardFunction | str], weights: Sequence[float] | None = None):
        if isinstance(functions, str) or callable(functions):
            functions = [functions]
        self.functions = [load_reward(f) if isinstance(f, str) else f for f in functions]
        if not self.functions:
            raise ValueError("GRPO needs at least one reward function, e.g. rewards=['number_match']")
        for fn in self.functions:
            if not callable(fn):
                raise ValueError(f"a reward must be callable as fn(prompts, completions, **columns), got "
                                 f"{type(fn).__name__}")
        weights = [1.0] * len(self.functions) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.functions) or not all(math.isfinite(w) for w in weights):
            raise ValueError(f"reward_weights must be {len(self.functions)} finite number(s), one per reward "
                             f"function ({', '.join(self.names)}), got {list(weights)}")
        self.weights = weights

    @property
    def names(self) -> list[str]:
        return [reward_name(f) for f in self.functions]

    def score(self, prompts: list, completions: list[str], columns: dict[str, list]) -> tuple[list[float],
                                                                                              dict[str, list[float]]]:
        """``(weighted totals, {function name: its scores})`` of ``completions``.

        Raises:
            ValueError: naming the function, when one raises, returns another count than one score per completion,
                or a value that is not a finite number.
        """
        by_name: dict[str, list[float]] = {}
        for fn, name in zip(self.functions, self.names):
            try:
                got = fn(prompts, completions, **columns)
            except Exception as e:  # any failure of user code stops the run, naming the function
                raise ValueError(f"reward function {name} raised {type(e).__name__}: {e} (it is called as "
                                 f"fn(prompts, completions, **columns) with the columns {sorted(columns)})") from e
            by_name[name] = check_scores(name, got, completions)
        totals = [sum(w * by_name[n][i] for w, n in zip(self.weights, by_name)) for i in range(len(completions))]
        return totals, by_name


def check_scores(name: str, got: Any, completions: list[str]) -> list[float]:
    """``got`` as a list of floats, one per completion, or a ValueError naming the function ``name``."""
    if hasattr(got, "tolist"):  # a tensor or an array
        got = got.tolist()
    if isinstance(got, (str, bytes)) or not isinstance(got, Sequence):
        raise ValueError(f"reward function {name} returned a {type(got).__name__}; return a list of "
                         f"{len(completions)} numbers, one per completion")
    if len(got) != len(completions):
        raise ValueError(f"reward function {name} returned {len(got)} scores for {len(completions)} completions; "
                         f"return one number per completion")
    scores = []
    for i, value in enumerate(got):
        number = float(value) if isinstance(value, numbers.Real) else None  # True counts as 1
        if number is None or not math.isfinite(number):
            raise ValueError(f"reward function {name} returned {value!r} for completion {i} "
                             f"({completions[i][:60]!r}); every score must be a finite number")
        scores.append(number)
    return scores


__all__ = ["Rewards", "load_reward", "reward_name", "check_scores", "BUILT_IN", "exact_match", "number_match",
           "json_parses", "json_match", "length_penalty"]
