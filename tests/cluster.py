"""Real worker and orchestrator processes on loopback for tests, stopped by the tests."""

from __future__ import annotations

import json
import random
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from orchestrator.up import Cluster, wait_http, wait_worker
from services.common import wire
from services.common.process import free_port, port_in_use

READY_TIMEOUT_S = 120.0
SGLANG_START_S = 90.0


@dataclass
class LocalCluster:
    cluster: Cluster = field(default_factory=Cluster)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)
    _sglang_ports: list[int] = field(default_factory=list)

    def worker(
        self, name: str, role: str, model, *extra: str, env: dict | None = None, output: Path | None = None
    ) -> str:
        port = free_port()
        args = ["-m", "services.worker", "--role", role, "--model", str(model), "--port", str(port), *extra]
        self.procs[name] = self.cluster.spawn(name, args, env=env, output=output)
        address = f"127.0.0.1:{port}"
        wait_worker(self.cluster, address, READY_TIMEOUT_S, (env or {}).get(wire.TOKEN_ENV))
        self.addresses[name] = address
        return address

    def group(self, name: str, role: str, model, hosts: tuple[str, ...], *extra: str, ep: int = 4) -> str:
        """One instance over len(hosts) "nodes", node k on hosts[k]; the leader's address once healthy."""
        port, store = free_port(hosts[0]), free_port(hosts[0])
        for node, host in enumerate(hosts):
            args = ["-m", "services.worker", "--role", role, "--model", str(model), "--host", host]
            args += ["--port", str(port), "--ep", str(ep), "--nnodes", str(len(hosts))]
            args += ["--node-rank", str(node), "--dist-init-addr", f"{hosts[0]}:{store}", *extra]
            self.procs[f"{name}-node{node}"] = self.cluster.spawn(f"{name} node {node}", args)
        address = f"{hosts[0]}:{port}"
        wait_worker(self.cluster, address, READY_TIMEOUT_S)
        self.addresses[name] = address
        return address

    def sglang_worker(
        self,
        name: str,
        model,
        record: Path,
        *flags: str,
        double: tuple[str, ...] = (),
        output: Path | None = None,
    ) -> tuple[str, int | None]:
        """Start an SGLang gRPC worker on CPU (`tests.doubles.sglang_cpu.worker`: SGLang's own entry
        point and servicer, the fake scheduler behind, recording to `record`); `flags` are SGLang's,
        `double` the fake scheduler's. Returns its gRPC address and, for a prefill, its bootstrap
        port; `wait_sglang` waits until it serves (start several, then wait)."""
        port = self._sglang_port()
        args = ["-m", "tests.doubles.sglang_cpu.worker", "--record", str(record), *double, "--"]
        args += ["--model-path", str(model), "--grpc-mode", "--device", "cpu", "--host", "127.0.0.1"]
        args += ["--port", str(port), "--skip-server-warmup", *flags]
        bootstrap = None
        if "prefill" in flags:
            bootstrap = free_port()
            args += ["--disaggregation-bootstrap-port", str(bootstrap)]
            # SGLang 0.5.23's server args are frozen by the time the servicer would turn its KV
            # events on by default: the chart names the publisher, and so does this (a port per
            # DP rank from +300, within this worker's block of ports).
            if "--kv-events-config" not in flags:
                endpoint = f"tcp://127.0.0.1:{port + 300}"
                args += [
                    "--kv-events-config",
                    json.dumps(dict(publisher="zmq", endpoint=endpoint, bind=True)),
                ]
        self.procs[name] = self.cluster.spawn(name, args, output=output)
        self.addresses[name] = address = f"127.0.0.1:{port}"
        return address, bootstrap

    def _sglang_port(self) -> int:
        """A `--port` for an SGLang worker: SGLang derives more from it (the HTTP sidecar on +1, the
        resolved gRPC port +10000, under attention DP its ZMQ ports from +233, KV events from +300),
        so it is taken below the ephemeral range, with those free and 1000 from this cluster's
        other SGLang workers."""
        rng = random.Random()
        while True:
            port = rng.randrange(20000, 29000)
            near = any(abs(port - p) < 1000 for p in self._sglang_ports)
            if not near and not any(
                port_in_use("127.0.0.1", q)
                for q in (
                    port,
                    port + 1,
                    port + 10000,
                    *range(port + 233, port + 240),
                    port + 300,
                    port + 301,
                )
            ):
                self._sglang_ports.append(port)
                return port

    def wait_sglang(self, address: str) -> None:
        """Until SGLang's standard gRPC health service says SERVING (no generation involved)."""
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
        deadline = time.monotonic() + SGLANG_START_S
        while time.monotonic() < deadline:
            if (why := self.cluster.dead()) is not None:
                raise RuntimeError(why)
            try:
                if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"SGLang worker {address} not serving after {SGLANG_START_S:.0f}s")

    def orchestrator(
        self,
        model,
        prefill: list[str],
        decode: list[str],
        *extra: str,
        output: Path | None = None,
        name: str = "orchestrator",
        env: dict | None = None,
    ) -> str:
        port = free_port()
        args = [
            "-m",
            "orchestrator.serve",
            "--model",
            str(model),
            "--port",
            str(port),
            "--prefill",
            *prefill,
            "--decode",
            *decode,
            *extra,
        ]
        self.procs[name] = self.cluster.spawn(name, args, env=env, output=output)
        url = f"http://127.0.0.1:{port}"
        wait_http(self.cluster, f"{url}/ready", READY_TIMEOUT_S)
        return url

    def smg(self, model, prefill: str, decode: str, bootstrap_port: int | None = None) -> str:
        """SGLang's gateway (PyPI `smg`) in PD mode over gRPC workers (the prefill's bootstrap server
        on its gRPC port for ours, `bootstrap_port` for SGLang's); its base URL once ready."""
        port, prometheus = free_port(), free_port()
        bootstrap = str(bootstrap_port or prefill.rsplit(":", 1)[1])
        args = ["-m", "smg", "launch", "--pd-disaggregation", "--prefill", f"grpc://{prefill}"]
        args += [bootstrap, "--decode", f"grpc://{decode}", "--model-path", str(model)]
        args += ["--tokenizer-path", str(model), "--host", "127.0.0.1", "--port", str(port)]
        args += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(prometheus)]
        args += ["--log-level", "error"]
        self.procs["smg"] = self.cluster.spawn("smg", args)
        url = f"http://127.0.0.1:{port}"
        wait_http(self.cluster, f"{url}/readiness", READY_TIMEOUT_S)
        return url

    def stub(self, name: str) -> pb_grpc.SglangSchedulerStub:
        return pb_grpc.SglangSchedulerStub(grpc.insecure_channel(self.addresses[name]))

    def load(self, name: str) -> pb.SchedulerLoad:
        return self.stub(name).GetLoads(pb.GetLoadsRequest(), timeout=5).loads[0]

    def assert_idle(self, *names: str, timeout: float = 10.0) -> None:
        """Wait until the named workers (default: prefill and decode) hold no requests and no KV."""
        names = names or ("prefill", "decode")
        deadline = time.monotonic() + timeout
        while True:
            loads = [self.load(n) for n in names]
            if all(ld.num_used_tokens == 0 and ld.num_total_reqs == 0 for ld in loads):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"workers still hold KV or requests: {loads}")
            time.sleep(0.1)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait()

    def stop(self) -> None:
        self.cluster.stop()


def wait_first_tokens(url: str, timeout: float = 30.0) -> None:
    """Wait until the orchestrator at `url` has a confirmed FirstTokens stream to every prefill
    instance (it opens them once it finds them ready): from then on, every request names its feed."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        data = httpx.get(f"{url}/admin/instances", timeout=5).json()["data"]
        if all(i["first_tokens"] for i in data if i["role"] == "prefill"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"no FirstTokens stream to some prefill instance: {data}")
        time.sleep(0.05)
