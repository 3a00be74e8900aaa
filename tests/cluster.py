"""Real worker and orchestrator processes on loopback for tests, stopped by the tests."""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from orchestrator.up import Cluster, wait_http, wait_worker
from services.common.process import free_port

READY_TIMEOUT_S = 120.0


@dataclass
class LocalCluster:
    cluster: Cluster = field(default_factory=Cluster)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def worker(
        self, name: str, role: str, model, *extra: str, env: dict | None = None, output: Path | None = None
    ) -> str:
        port = free_port()
        args = ["-m", "services.worker", "--role", role, "--model", str(model), "--port", str(port), *extra]
        self.procs[name] = self.cluster.spawn(name, args, env=env, output=output)
        address = f"127.0.0.1:{port}"
        wait_worker(self.cluster, address, READY_TIMEOUT_S)
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

    def orchestrator(
        self,
        model,
        prefill: list[str],
        decode: list[str],
        *extra: str,
        output: Path | None = None,
        name: str = "orchestrator",
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
        self.procs[name] = self.cluster.spawn(name, args, output=output)
        url = f"http://127.0.0.1:{port}"
        wait_http(self.cluster, f"{url}/ready", READY_TIMEOUT_S)
        return url

    def smg(self, model, prefill: str, decode: str) -> str:
        """SGLang's gateway (PyPI `smg`) in PD mode over our workers' gRPC; its base URL once ready."""
        port, prometheus = free_port(), free_port()
        args = ["-m", "smg", "launch", "--pd-disaggregation", "--prefill", f"grpc://{prefill}"]
        args += [prefill.rsplit(":", 1)[1], "--decode", f"grpc://{decode}", "--model-path", str(model)]
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
