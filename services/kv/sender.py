"""The transfer half of a prefill rank: one thread that does every room's KV page writes in order.

Jobs are typed: `Write` (descriptors of one layer's new KV into a room's decode pages), `Finish`
(the room's last write is queued: report and free) and `Barrier` (everything queued before it
is done). Writes of the same room that queue up behind each other (the sender fell behind the
compute) go out as one batch: fewer, larger transfer calls.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from services.kv.rooms import Room
from services.kv.transfer import TransferEngine, TransferError
from services.models.device import DeviceMark, use_in_thread

log = logging.getLogger(__name__)
Descriptors = tuple[list[int], list[int], list[int]]
"""(source addresses, destination addresses, lengths)."""


@dataclass
class TransferStats:
    """Cumulative KV hand-off figures of one prefill rank (the sender thread writes, RPCs read)."""

    bytes: int = 0
    seconds: float = 0.0
    """Time spent inside transfer-engine writes."""
    rooms: int = 0
    failed_rooms: int = 0

    @property
    def speed_gb_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def latency_ms(self) -> float:
        return 1000 * self.seconds / self.rooms if self.rooms else 0.0


@dataclass
class Write:
    """Copy `descs` into the room's decode pages (skipped once the room has ended), once the device
    has written them (`written`)."""

    room: Room
    descs: Descriptors
    written: DeviceMark | None = None
    """Passed once the GPU has run the kernels that wrote these pages (None: written already)."""


@dataclass
class Finish:
    """Every write of the room is queued ahead of this: run `done` (report, free the pages)."""

    room: Room
    done: Callable[[], None]


@dataclass
class Barrier:
    """Set `event` once every job queued before it has run."""

    event: threading.Event


Job = Write | Finish | Barrier


class KVSender:
    """Runs jobs in order on its own thread; counts bytes per room and for the rank."""

    def __init__(
        self,
        transfer: TransferEngine,
        fault: Callable[[], None] | None = None,
        device: torch.device | str = "cpu",
    ):
        # `fault` (fault injection, tests): called before each write; a TransferError fails it.
        self.transfer, self.fault = transfer, fault
        self.device = torch.device(device)
        """The rank's device: the thread waits on its events."""
        self.stats = TransferStats()
        self.sent: dict[int, int] = {}
        """Bytes written per live room id (dropped at Finish)."""
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="kv-sender", daemon=True).start()

    def put(self, job: Job) -> None:
        self._jobs.put(job)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until every job queued so far has run (writes of ended rooms are skipped)."""
        barrier = Barrier(threading.Event())
        self._jobs.put(barrier)
        return barrier.event.wait(timeout)

    def _run(self) -> None:
        use_in_thread(self.device)
        held: Job | None = None
        while True:
            job = held or self._jobs.get()
            held = None
            try:
                if isinstance(job, Write):
                    held = self._write(self._merge(job))
                elif isinstance(job, Finish):
                    self.stats.rooms += 1
                    self.stats.failed_rooms += job.room.error is not None
                    job.done()
                    self.sent.pop(job.room.room_id, None)
                else:
                    job.event.set()
            except Exception:  # one bad room must not stop the sender for all others
                log.exception("KV sender job failed")

    def _merge(self, job: Write) -> tuple[Write, Job | None]:
        srcs, dsts, lens = (list(x) for x in job.descs)
        written = job.written
        while True:
            try:
                nxt = self._jobs.get_nowait()
            except queue.Empty:
                return Write(job.room, (srcs, dsts, lens), written), None
            if not isinstance(nxt, Write) or nxt.room is not job.room:
                return Write(job.room, (srcs, dsts, lens), written), nxt
            for acc, part in zip((srcs, dsts, lens), nxt.descs, strict=True):
                acc.extend(part)
            written = nxt.written or written  # the later mark covers the earlier writes

    def _write(self, merged: tuple[Write, Job | None]) -> Job | None:
        job, held = merged
        room = job.room
        if room.done or room.attach is None:
            return held  # failed or released: skip the remaining layers
        if job.written is not None:
            job.written.wait()  # the GPU has written these pages (waits for nothing on the CPU)
        try:
            start = time.perf_counter()
            if self.fault is not None:
                self.fault()
            self.transfer.write(room.attach.transfer_session, *job.descs)
            self.stats.seconds += time.perf_counter() - start
            n = sum(job.descs[2])
            self.stats.bytes += n
            self.sent[room.room_id] = self.sent.get(room.room_id, 0) + n
        except TransferError as e:  # the decode's side of the transfer: say so (`CallError.peer`)
            room.fail("UNAVAILABLE", f"room {room.room_id}: {e}", peer="decode")
        except Exception as e:  # e.g. a bad destination: fail this room, keep the sender going
            room.fail("INTERNAL", f"room {room.room_id}: KV write failed: {e!r}")
        return held
