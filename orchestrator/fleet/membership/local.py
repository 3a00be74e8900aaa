"""Instances as process groups on this machine: `moeserve worker` children of the orchestrator.

Keeps the desired number of instances per role: a new one is spawned for every instance that
fails (its process exits, or it stops answering) or never comes up within READY_TIMEOUT_S;
scaling up spawns, scaling down drains the surplus (starting ones first, then the least loaded)
and stops each process once its instance is gone. A failed instance costs only itself: the
orchestrator and the other instances go on. Workers bind loopback (`--host`), die with the
orchestrator (parent-death signal) and are stopped with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from orchestrator.fleet.membership import Membership, ScaleError
from orchestrator.fleet.registry import Instance, Registry, State
from services.common.process import free_port, spawn_env
from services.common.roles import ROLES, Role

SUPERVISE_S = 0.5
READY_TIMEOUT_S = 180.0
STOP_GRACE_S = 4.0
MAX_INSTANCES = 64


class Backend(Membership):
    name = "local"

    def __init__(
        self,
        registry: Registry,
        model: Path,
        prefill: int = 1,
        decode: int = 1,
        prefill_ep: int = 1,
        decode_ep: int = 1,
        host: str = "127.0.0.1",
        worker_args: tuple[str, ...] = (),
    ):
        super().__init__(registry)
        self.model, self.host, self.worker_args = Path(model), host, tuple(worker_args)
        self.want: dict[Role, int] = {"prefill": prefill, "decode": decode}
        self.ep: dict[Role, int] = {"prefill": prefill_ep, "decode": decode_ep}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._backoff: dict[Role, tuple[int, float]] = {}
        """Per role: instances in a row that died before serving, and no new spawn before this time."""

    def desired(self) -> dict[Role, int]:
        return dict(self.want)

    def check_scale(self, role: Role, count: int) -> None:
        if not 0 <= count <= MAX_INSTANCES:
            raise ScaleError(f"{role} instances must be between 0 and {MAX_INSTANCES}, not {count}")

    async def start(self) -> None:
        self.registry.on_gone.append(self._on_gone)
        self._reconcile()
        self._task = asyncio.create_task(self._supervise())

    async def scale(self, role: Role, count: int) -> None:
        self.check_scale(role, count)
        self.want[role] = count
        self._reconcile()

    def _live(self, role: Role) -> list[Instance]:
        return self.registry.of(role, State.STARTING, State.READY)

    def _reconcile(self) -> None:
        """Spawn or drain until every role has its desired number of live instances."""
        for role in ROLES:
            live = self._live(role)
            _, not_before = self._backoff.get(role, (0, 0.0))
            if time.monotonic() >= not_before:
                for _ in range(self.want[role] - len(live)):
                    self._spawn(role)
            surplus = len(live) - self.want[role]
            if surplus > 0:
                # Starting instances first (they hold nothing), then the least loaded.
                order = sorted(live, key=lambda i: (i.state == State.READY, i.inflight))
                for inst in order[:surplus]:
                    self.registry.drain(inst)

    def _spawn(self, role: Role) -> Instance:
        port = free_port(self.host)
        args = ["-m", "services.worker", "--role", role, "--model", str(self.model), "--host", self.host]
        args += ["--port", str(port), "--ep", str(self.ep[role]), *self.worker_args]
        if not any(a.startswith("--device") for a in self.worker_args):
            # An embedded cluster runs on the CPU (its KV moves over Mooncake's non-CUDA wheel)
            # unless told otherwise (`--worker-arg=--device=cuda`).
            args += ["--device", "cpu"]
        env = spawn_env({**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        proc = subprocess.Popen([sys.executable, *args], env=env, start_new_session=True)
        inst = self.registry.add(role, f"{self.host}:{port}")
        inst.pid = proc.pid
        self.procs[inst.id] = proc
        return inst

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(SUPERVISE_S)
            for inst_id, proc in list(self.procs.items()):
                inst = self.registry.instances.get(inst_id)
                if inst is None:
                    continue
                if proc.poll() is not None and inst.state in (State.STARTING, State.READY, State.DRAINING):
                    inst.set_state(State.FAILED, f"its process exited with code {proc.returncode}")
                    self._on_gone(inst)
                elif inst.state == State.STARTING and time.monotonic() - inst.since > READY_TIMEOUT_S:
                    inst.set_state(State.FAILED, f"not healthy within {READY_TIMEOUT_S:.0f}s")
                    self._on_gone(inst)
            self._reconcile()

    def _on_gone(self, inst: Instance) -> None:
        """An instance drained or failed: stop its processes and forget it (once)."""
        proc = self.procs.pop(inst.id, None)
        if proc is None:
            return
        if inst.state == State.FAILED and inst.info is None:  # it never served: back off
            failures = self._backoff.get(inst.role, (0, 0.0))[0] + 1
            self._backoff[inst.role] = (failures, time.monotonic() + min(30.0, 2.0**failures))
        elif inst.info is not None:
            self._backoff.pop(inst.role, None)
        task = asyncio.get_running_loop().create_task(self._stop(inst, proc))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, inst: Instance, proc: subprocess.Popen[bytes]) -> None:
        await asyncio.to_thread(_terminate, proc)
        await self.registry.forget(inst)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        procs = list(self.procs.values())
        self.procs.clear()
        await asyncio.gather(*(asyncio.to_thread(_terminate, p) for p in procs), *self._stopping)


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the worker's EP group stops together), SIGKILL after STOP_GRACE_S."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
