"""Fixed instances from configuration: `host:port` (ours: the bootstrap port is the gRPC port), or
`grpc://host:port` optionally followed by a bootstrap port (SGLang prefill workers serve KV
bootstrap on a port of their own), as SMG's `--prefill grpc://HOST:PORT BOOTSTRAP_PORT` takes it."""

from __future__ import annotations

from orchestrator.fleet.membership import Membership
from orchestrator.fleet.registry import Registry
from services.common.roles import Role


def parse_targets(tokens: list[str]) -> list[tuple[str, int | None]]:
    """['grpc://h:1', '8998', 'h:2'] -> [('h:1', 8998), ('h:2', None)]; errors name the bad token."""
    out: list[tuple[str, int | None]] = []
    after_grpc = False
    for token in tokens:
        if token.isdigit():
            if not after_grpc:
                raise ValueError(f"bootstrap port {token} must follow a grpc://HOST:PORT address")
            out[-1], after_grpc = (out[-1][0], int(token)), False
            continue
        after_grpc = token.startswith("grpc://")
        address = token.removeprefix("grpc://")
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{token!r} is not HOST:PORT or grpc://HOST:PORT")
        out.append((address, None))
    return out


class Backend(Membership):
    name = "static"

    def __init__(self, registry: Registry, prefill: list[str], decode: list[str]):
        super().__init__(registry)
        self.targets: dict[Role, list[tuple[str, int | None]]] = {
            "prefill": parse_targets(prefill),
            "decode": parse_targets(decode),
        }

    async def start(self) -> None:
        for role, targets in self.targets.items():
            for address, bootstrap in targets:
                self.registry.add(role, address, bootstrap)
