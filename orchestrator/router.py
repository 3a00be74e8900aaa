"""Picks the (prefill, decode) pair for a request and draws its bootstrap room.

Least-load: the healthy worker with the fewest requests in flight from this orchestrator, decode
chosen first, then prefill; ties go round-robin so idle pools spread work evenly.
"""

from __future__ import annotations

import itertools
import random

from orchestrator.workers import Worker, WorkerPool

ROOM_MAX = 2**31 - 1  # bootstrap_room is an int32 on SGLang's wire


class NoWorkers(RuntimeError):
    """No healthy worker of a role."""


class Router:
    def __init__(self, pool: WorkerPool, seed: int | None = None):
        self.pool = pool
        self._rr = itertools.count()
        self._rng = random.Random(seed)
        self.live_rooms: set[int] = set()

    def pick(self) -> tuple[Worker, Worker]:
        decode = self._least_loaded(self.pool.decode, "decode")
        prefill = self._least_loaded(self.pool.prefill, "prefill")
        return prefill, decode

    def _least_loaded(self, workers: list[Worker], role: str) -> Worker:
        healthy = [w for w in workers if w.healthy]
        if not healthy:
            raise NoWorkers(f"no healthy {role} worker ({len(workers)} configured); check the {role} pool")
        low = min(w.inflight for w in healthy)
        candidates = [w for w in healthy if w.inflight == low]
        return candidates[next(self._rr) % len(candidates)]

    def new_room(self) -> int:
        while True:
            room = self._rng.randint(1, ROOM_MAX)
            if room not in self.live_rooms:
                self.live_rooms.add(room)
                return room

    def end_room(self, room: int) -> None:
        self.live_rooms.discard(room)
