"""The Mooncake transfer engine: one per rank, its KV storage registered once.

Protocol `tcp` works on one machine (and in tests); `rdma` is for clusters. Metadata goes through
Mooncake's peer-to-peer handshake (`P2PHANDSHAKE`), so no etcd is needed. The library loads
Debian's libibverbs even for TCP.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator

log = logging.getLogger(__name__)
BENIGN = ("Logging before InitGoogleLogging", "Local segment descriptor not found")


class TransferError(RuntimeError):
    """A KV write to a peer failed (peer gone, bad address, network down)."""


class TransferEngine:
    """One rank's Mooncake transfer engine: registers its KV storage, writes into peers'."""

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp", device: str = ""):
        debug = log.isEnabledFor(logging.DEBUG)
        os.environ.setdefault("MC_LOG_LEVEL", "INFO" if debug else "ERROR")  # Mooncake's own level
        try:
            from mooncake.engine import TransferEngine as _Mooncake
        except ImportError as e:  # most often: Debian libibverbs1 is missing
            raise TransferError(
                f"cannot load the Mooncake transfer engine ({e}); install the Debian package libibverbs1"
            ) from e
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"transfer protocol must be tcp or rdma, got {protocol!r}")
        self._engine = _Mooncake()
        with _stderr_captured() as said:
            rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device)
        # Start-up always says two alarming but harmless things (glog not initialised; no local
        # segment descriptor yet, before one is registered): pass on everything else, all if it failed.
        lines = said if rc != 0 or debug else [ln for ln in said if not any(b in ln for b in BENIGN)]
        if lines:
            sys.stderr.write("".join(lines))
        if rc != 0:
            raise TransferError(
                f"Mooncake initialize({hostname}, {protocol}, device={device!r}) failed: {rc}"
            )
        self.session_id = f"{hostname}:{self._engine.get_rpc_port()}"
        self.protocol = protocol
        self._lock = threading.Lock()

    def register(self, address: int, length: int) -> None:
        rc = self._engine.register_memory(address, length)
        if rc != 0:
            raise TransferError(f"registering {length} bytes at {address:#x} with Mooncake failed: {rc}")

    def write(self, target_session: str, srcs: list[int], dsts: list[int], lengths: list[int]) -> None:
        """Write local buffers into the peer's registered memory; blocks until done."""
        if not srcs:
            return
        with self._lock:
            rc = self._engine.batch_transfer_sync_write(target_session, srcs, dsts, lengths)
        if rc != 0:
            raise TransferError(f"KV write of {sum(lengths)} bytes to {target_session} failed ({rc})")


@contextlib.contextmanager
def _stderr_captured() -> Iterator[list[str]]:
    """The lines the process writes to file descriptor 2 meanwhile (C libraries too), kept aside."""
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+", errors="replace") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.readlines())
