"""Leases a (prefill, decode) pair and a bootstrap room to each request.

Decode is chosen first, with the shared least-loaded rule (`services.common.picking`): the `ready`
instance with the fewest requests in flight from this orchestrator, ties in turn. Prefill is the
prefill policy's choice for the prompt (`policies`; by default prefix affinity), with the DP rank
to pin. Starting, draining, failed and gone instances get nothing new.

The room also pins the rank: SGLang's prefill places a request on DP rank `room % ranks` (its
`follow_bootstrap_room` balancing, the default for a PD prefill, which ignores the request's
`data_parallel_rank` and refuses a request that lands elsewhere), so a pinned rank's room is drawn
congruent to it modulo the instance's DP ranks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from orchestrator.dispatch.policies import PrefillPolicy, create
from orchestrator.fleet.registry import Instance, Registry, State
from services.common.picking import LeastLoaded

ROOM_MAX = 2**31 - 1  # bootstrap_room is an int32 on SGLang's wire


class NoWorkers(RuntimeError):
    """No ready instance of a role."""


@dataclass(eq=False)
class Lease:
    """One request's hold on its two workers and its room; `release()` gives them back exactly once."""

    prefill: Instance
    decode: Instance
    room: int
    request_id: str
    _router: Router = field(repr=False)
    prefill_rank: int | None = None
    """The prefill instance's DP rank to pin (None: its own choice)."""
    decode_first: bool = False
    """The request goes to decode alone, which forwards it to prefill (`services.common.wire`)."""
    released: bool = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        for inst in (self.prefill, self.decode):
            inst.inflight -= 1
            inst.requests.discard(self.request_id)
        self._router.live_rooms.discard(self.room)


class Router:
    """Hands out leases on the registry's ready instances, least loaded first."""

    def __init__(
        self,
        registry: Registry,
        seed: int | None = None,
        policy: PrefillPolicy | None = None,
        decode_first: bool = True,
    ):
        self.registry = registry
        self.decode_first = decode_first
        """Send requests decode-first to pairs whose workers both serve it (else dual dispatch)."""
        self.policy = policy or create("least_load")
        self._decode_picker = LeastLoaded()
        self._rng = random.Random(seed)
        self.live_rooms: set[int] = set()

    def lease(
        self, request_id: str = "", avoid: frozenset[str] = frozenset(), prompt_ids: Sequence[int] = ()
    ) -> Lease:
        """Picks decode then prefill (for `prompt_ids`) and counts the request on both; raises
        NoWorkers if a role has none.

        `avoid`: instance ids this request already failed on (a retry prefers others, but takes
        one of them again rather than none).
        """
        decode = self._decode_picker.pick(
            self._ready(self.registry.decode, "decode", avoid), lambda i: i.inflight
        )
        prefill, rank = self.policy.pick(self._ready(self.registry.prefill, "prefill", avoid), prompt_ids)
        for inst in (prefill, decode):
            inst.inflight += 1
            inst.served += 1
            inst.requests.add(request_id)
            inst.breaker.picked()
        single = self.decode_first and prefill.decode_first and decode.decode_first
        room = self._new_room(rank, len(prefill.loads))
        return Lease(prefill, decode, room, request_id, self, rank, decode_first=single)

    def _ready(self, instances: list[Instance], role: str, avoid: frozenset[str]) -> list[Instance]:
        ready = [i for i in instances if i.state == State.READY and i.breaker.allows()]
        ready = [i for i in ready if i.id not in avoid] or ready
        if not ready:
            states = (
                ", ".join(
                    f"{i.id} {i.state.value}"
                    + ("" if i.breaker.allows() else f", breaker {i.breaker.state.value}")
                    for i in instances
                )
                or "none registered"
            )
            raise NoWorkers(f"no ready {role} instance ({states}); check the {role} pool")
        return ready

    def _new_room(self, rank: int | None = None, ranks: int = 1) -> int:
        """A room no live lease holds; congruent to `rank` modulo `ranks` when a rank is pinned."""
        while True:
            room = self._rng.randint(1, ROOM_MAX)
            if rank is not None and ranks > 1:
                room -= (room - rank) % ranks
                room += ranks if room < 1 else 0
            if room not in self.live_rooms:
                self.live_rooms.add(room)
                return room
