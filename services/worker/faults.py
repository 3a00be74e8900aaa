"""Fault injection for tests, from the environment: off unless set."""

from __future__ import annotations

import os
import threading


class Refusals:
    """`MOESERVE_FAULT_REFUSE_GENERATE=N`: the instance refuses its first N requests (UNAVAILABLE),
    as an overloaded worker would: Generate calls, and Attaches that carry a forwarded request
    (decode-first, where prefill gets no Generate of its own)."""

    MESSAGE = "refused (MOESERVE_FAULT_REFUSE_GENERATE)"

    def __init__(self) -> None:
        self.left = int(os.environ.get("MOESERVE_FAULT_REFUSE_GENERATE", "0") or 0)
        self._lock = threading.Lock()

    def take(self) -> bool:
        """True if this request is to be refused."""
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True
