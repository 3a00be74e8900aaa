"""Fault injection for tests, from the environment: off unless set."""

from __future__ import annotations

import os
import threading
import time

from services.kv.transfer import TransferError


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


class FailedWrites:
    """`MOESERVE_FAULT_FAIL_KV_WRITES=N`: a prefill rank's first N KV writes fail after a stall of
    `STALL_S`, as writes to a decode that cannot be reached time out (the room fails, the decode's
    side blamed). The stall lets everything else of the request happen first, as it would."""

    STALL_S = 1.0

    def __init__(self) -> None:
        self.left = int(os.environ.get("MOESERVE_FAULT_FAIL_KV_WRITES", "0") or 0)
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise TransferError if this write is to fail (the sender calls it before each write)."""
        with self._lock:
            if self.left <= 0:
                return
            self.left -= 1
        time.sleep(self.STALL_S)
        raise TransferError("the KV write timed out (MOESERVE_FAULT_FAIL_KV_WRITES)")
