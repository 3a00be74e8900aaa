"""Leases a (prefill, decode) pair and a bootstrap room to each request.

Decode is chosen first, then prefill, each with the shared least-loaded rule (`services.picking`):
the healthy worker with the fewest requests in flight from this orchestrator, ties in turn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from orchestrator.workers import Worker, WorkerPool
from services.picking import LeastLoaded

ROOM_MAX = 2**31 - 1  # bootstrap_room is an int32 on SGLang's wire


class NoWorkers(RuntimeError):
    """No healthy worker of a role."""


@dataclass(eq=False)
class Lease:
    """One request's hold on its two workers and its room; `release()` gives them back exactly once."""

    prefill: Worker
    decode: Worker
    room: int
    _router: Router = field(repr=False)
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.prefill.inflight -= 1
        self.decode.inflight -= 1
        self._router.live_rooms.discard(self.room)


class Router:
    """Hands out leases on the pool's workers, least loaded first."""

    def __init__(self, pool: WorkerPool, seed: int | None = None):
        self.pool = pool
        self._pickers = {"prefill": LeastLoaded(), "decode": LeastLoaded()}
        self._rng = random.Random(seed)
        self.live_rooms: set[int] = set()

    def lease(self) -> Lease:
        """Picks decode then prefill and counts the request on both; raises NoWorkers if a role has none."""
        decode = self._pick(self.pool.decode, "decode")
        prefill = self._pick(self.pool.prefill, "prefill")
        prefill.inflight += 1
        decode.inflight += 1
        return Lease(prefill, decode, self._new_room(), self)

    def _pick(self, workers: list[Worker], role: str) -> Worker:
        healthy = [w for w in workers if w.healthy]
        if not healthy:
            raise NoWorkers(f"no healthy {role} worker ({len(workers)} configured); check the {role} pool")
        return self._pickers[role].pick(healthy, load=lambda w: w.inflight)

    def _new_room(self) -> int:
        while True:
            room = self._rng.randint(1, ROOM_MAX)
            if room not in self.live_rooms:
                self.live_rooms.add(room)
                return room
