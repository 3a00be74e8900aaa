"""Fault injection for tests, from the environment: off unless set."""

from __future__ import annotations

import os
import threading
import time

from services.kv.transfer import TransferError


class Countdown:
    """The first N calls of `take` (N from the environment variable `name`, 0 if unset) are True."""

    def __init__(self, name: str) -> None:
        self.left = int(os.environ.get(name, "0") or 0)
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True


class Refusals(Countdown):
    """`MOESERVE_FAULT_REFUSE_GENERATE=N`: the instance refuses its first N requests (UNAVAILABLE),
    as an overloaded worker would: Generate calls, and Attaches that carry a forwarded request
    (decode-first, where prefill gets no Generate of its own). `take`: True if this one is refused."""

    MESSAGE = "refused (MOESERVE_FAULT_REFUSE_GENERATE)"

    def __init__(self) -> None:
        super().__init__("MOESERVE_FAULT_REFUSE_GENERATE")


class FailedWrites(Countdown):
    """`MOESERVE_FAULT_FAIL_KV_WRITES=N`: a prefill rank's first N KV writes fail after a stall of
    `STALL_S`, as writes to a decode that cannot be reached time out (the room fails, the decode's
    side blamed). The stall lets everything else of the request happen first, as it would."""

    STALL_S = 1.0

    def __init__(self) -> None:
        super().__init__("MOESERVE_FAULT_FAIL_KV_WRITES")

    def check(self) -> None:
        """Raise TransferError if this write is to fail (the sender calls it before each write)."""
        if self.take():
            time.sleep(self.STALL_S)
            raise TransferError("the KV write timed out (MOESERVE_FAULT_FAIL_KV_WRITES)")
