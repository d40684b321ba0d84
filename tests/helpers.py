"""Small helpers shared by test modules (importable: tests/ is on sys.path through its conftest)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], object], timeout: float, what: str, every: float = 0.5) -> object:
    """pred()'s first truthy value, polled every `every` s; AssertionError naming `what` after `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
