"""How an instance's DP controller (rank 0) and its ranks reach each other.

Rank 0 calls its own rank in process; every other rank is reached over ZeroMQ: each rank binds a
PULL socket for commands, rank 0 binds one for events, and each side PUSHes to the other's. ZeroMQ
rather than torch.distributed object collectives because calls are point to point and
asynchronous (a collective would stall every rank's lockstep), and TCP addresses carry to ranks
on other hosts unchanged. Messages are pickled: bind only on the instance's own network.
"""

from __future__ import annotations

import logging
import pickle
import threading
from collections.abc import Callable
from typing import Any, Protocol

import zmq

log = logging.getLogger(__name__)
POLL_MS = 200
SEND_TIMEOUT_MS = 2000
"""A send that cannot be queued for this long fails (the peer is gone and its queue is full)."""


class Link(Protocol):
    """One direction of a controller <-> rank connection."""

    def send(self, message: Any) -> None: ...


class LocalLink:
    """In process: a send is a direct call (rank 0 and its own DP controller)."""

    def __init__(self, handle: Callable[[Any], None]):
        self.send = handle


class ZmqSender:
    """A PUSH socket connected to a peer's PULL; any thread may send."""

    def __init__(self, context: zmq.SyncContext, address: str):
        self._socket = context.socket(zmq.PUSH)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self._socket.connect(address)
        self.address = address
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._lock:
            try:
                self._socket.send(data)
            except zmq.Again:
                raise ConnectionError(f"{self.address} takes no messages (its rank is gone?)") from None

    def close(self) -> None:
        with self._lock:
            self._socket.close()


class ZmqReceiver:
    """A PULL socket bound on `host` (a free port), reached at `advertise`; its thread hands each
    message to `handle`."""

    def __init__(
        self, context: zmq.SyncContext, host: str, advertise: str, handle: Callable[[Any], None], name: str
    ):
        self._socket = context.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        if ":" in host or ":" in advertise:
            self._socket.setsockopt(zmq.IPV6, 1)
        port = self._socket.bind_to_random_port(f"tcp://{_bracket(host)}")
        self.address = f"tcp://{_bracket(advertise)}:{port}"
        self._handle = handle
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=2)
        self._socket.close()

    def _run(self) -> None:
        while not self._closed.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            message = pickle.loads(self._socket.recv())
            try:
                self._handle(message)
            except Exception:  # one bad message must not stop the channel
                log.exception("handling %s failed", type(message).__name__)


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host
