"""Decisions every process takes together, and Ctrl-C.

Every decision that ends or changes a run (a NaN, an interrupt, early stopping, a probe's verdict) is taken by all
processes together: one that decided alone would leave the others waiting forever in the next collective.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any

import torch


class Processes:
    """The processes of one run, as accelerate started them (one, or several under DDP/FSDP/DeepSpeed)."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.world = accelerator.num_processes

    def any(self, flag: bool) -> bool:
        """``flag`` OR-ed over all processes, so that a decision to stop is the same everywhere."""
        if self.world == 1:
            return flag
        acc = self.accelerator
        return bool(acc.reduce(torch.tensor(int(flag), device=acc.device), "sum") > 0)

    def all(self, ok: bool) -> bool:
        """True only if every process found ``ok``: processes must train the same way."""
        return not self.any(not ok)

    def main_value(self, value: Any) -> Any:
        """The main process's ``value`` on every process (a path it alone may see, on another machine's disk)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value])[0]


class CtrlC:
    """While active, Ctrl-C (SIGINT) only sets ``requested``; the training loop stops at the next step boundary.

    A KeyboardInterrupt raised mid-step can land between ``optimizer.step()`` and ``self.step += 1``, which saved
    updated weights under the old step number and made resume apply that step twice (issue 9). A second Ctrl-C
    stops at once, without a checkpoint (the last one written stays).
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():  # Python runs signal handlers only there
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this step (press it again to stop at once, without a checkpoint)",
              file=sys.stderr, flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._installed:  # a handler set outside Python reads as None and cannot be put back: use the default
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
