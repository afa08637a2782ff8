"""How a failure the user can act on is shown: one line, no traceback (the `lora` command and the recipes)."""

from __future__ import annotations

# Failures the user can act on: our ValueErrors (they say what is wrong and how to fix it), a file that cannot be
# read or written, a NaN stop, Ctrl-C. They print one line; anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError, KeyboardInterrupt)


def one_line(error: BaseException) -> str:
    """``error``'s message on one line (Ctrl-C has none of its own)."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    return " ".join(str(error).splitlines()) or type(error).__name__
