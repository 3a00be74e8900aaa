"""The Mooncake transfer engine: one per rank, its KV storage registered once.

Protocol `tcp` works on one machine (and in tests); `rdma` is for clusters. Metadata goes through
Mooncake's peer-to-peer handshake (`P2PHANDSHAKE`), so no etcd is needed. The library loads
Debian's libibverbs even for TCP.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A KV write to a peer failed (peer gone, bad address, network down)."""


class TransferEngine:
    """One rank's Mooncake transfer engine: registers its KV storage, writes into peers'."""

    def __init__(self, hostname: str = "127.0.0.1", protocol: str = "tcp", device: str = ""):
        os.environ.setdefault("GLOG_minloglevel", "2")  # Mooncake logs through glog; keep errors only
        try:
            from mooncake.engine import TransferEngine as _Mooncake
        except ImportError as e:  # most often: Debian libibverbs1 is missing
            raise TransferError(
                f"cannot load the Mooncake transfer engine ({e}); install the Debian package libibverbs1"
            ) from e
        if protocol not in ("tcp", "rdma"):
            raise ValueError(f"transfer protocol must be tcp or rdma, got {protocol!r}")
        self._engine = _Mooncake()
        rc = self._engine.initialize(hostname, "P2PHANDSHAKE", protocol, device)
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
