"""The admin API: the pools and instances, scaling a pool, draining an instance.

    GET  /admin/pools                       desired and actual instances per role
    GET  /admin/instances                   every instance: state, EP width, load per DP rank
    POST /admin/pools/{role}/scale          {"count": N}: scale the role (drains before removing)
    POST /admin/instances/{id}/drain        {"deadline_s": S}: stop sending it work, let it finish
    GET  /admin/autoscaler                  its signals, last evaluation per role and decisions

Guarded (`check_admin`, run by `guard.Guard` before the routes) by its own bearer token
(`--admin-token` / MOESERVE_ADMIN_TOKEN), never by an API key.
Without a token configured, the admin API answers loopback clients only. Errors have the
OpenAI error shape: 401 without a valid token, 403 for an API key or a remote client without a
token configured.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, Field

from orchestrator.errors import ApiError
from orchestrator.fleet.autoscaler import Autoscaler
from orchestrator.fleet.membership import Membership, ScaleError
from orchestrator.fleet.registry import DRAIN_DEADLINE_S, Registry, State
from services.common.process import loopback_only
from services.common.roles import ROLES

_tasks: set[asyncio.Task[None]] = set()


class ScaleBody(BaseModel):
    count: int = Field(ge=0, le=1024, description="instances the role should have")


class DrainBody(BaseModel):
    deadline_s: float = Field(default=DRAIN_DEADLINE_S, gt=0, le=86400)


def check_admin(request: Request, token: str | None, api_keys: frozenset[str], public: bool = False) -> None:
    """Raise the ApiError an admin request without the right credentials gets (`public`: the
    server listens beyond loopback, where only a token opens the admin API)."""
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth.startswith("Bearer ") else ""
    if token:
        if given and hmac.compare_digest(given, token):
            return
        if given in api_keys:
            raise ApiError(
                403,
                "an API key cannot use the admin API; send the admin token",
                "permission_error",
                "forbidden",
            )
        raise ApiError(
            401,
            "invalid or missing admin token; send Authorization: Bearer <admin token>",
            "authentication_error",
            "invalid_admin_token",
        )
    if public:
        raise ApiError(
            403,
            "the admin API needs --admin-token (MOESERVE_ADMIN_TOKEN) when the server listens beyond "
            "loopback: a proxy beside it would make every client look local",
            "permission_error",
            "forbidden",
        )
    if not loopback_only(request.client.host if request.client else ""):
        raise ApiError(
            403,
            "the admin API answers loopback clients only unless --admin-token is set",
            "permission_error",
            "forbidden",
        )


def pools(registry: Registry, membership: Membership) -> dict[str, Any]:
    desired = membership.desired()
    out: dict[str, Any] = {"membership": membership.name}
    for role in ROLES:
        insts = registry.of(role)
        out[role] = {
            "desired": desired[role],
            "instances": len([i for i in insts if i.state not in (State.GONE, State.FAILED)]),
            "ready": len([i for i in insts if i.state == State.READY]),
            "states": {s.value: len([i for i in insts if i.state == s]) for s in State},
        }
    return out


def add_admin_routes(
    app: FastAPI, registry: Registry, membership: Membership, autoscaler: Autoscaler | None = None
) -> None:
    @app.get("/admin/autoscaler")
    async def get_autoscaler() -> dict[str, Any]:
        return autoscaler.describe() if autoscaler is not None else {"enabled": False}

    @app.get("/admin/pools")
    async def get_pools() -> dict[str, Any]:
        return pools(registry, membership)

    @app.get("/admin/instances")
    async def get_instances() -> dict[str, Any]:
        return {"data": [i.describe() for i in registry.all]}

    @app.post("/admin/pools/{role}/scale", status_code=202)
    async def scale(role: str, body: ScaleBody) -> dict[str, Any]:
        if role not in ROLES:
            raise ApiError(404, f"no pool {role!r}; pools: {', '.join(ROLES)}", code="unknown_pool")
        try:
            membership.check_scale(role, body.count)
        except ScaleError as e:
            raise ApiError(409, str(e), code="cannot_scale") from None
        task = asyncio.create_task(membership.scale(role, body.count))
        _tasks.add(task)
        task.add_done_callback(_tasks.discard)
        return {"role": role, "desired": body.count}

    @app.post("/admin/instances/{instance_id}/drain", status_code=202)
    async def drain(instance_id: str, body: DrainBody | None = None) -> dict[str, Any]:
        inst = registry.instances.get(instance_id)
        if inst is None:
            raise ApiError(
                404, f"no instance {instance_id!r}; GET /admin/instances lists them", code="unknown_instance"
            )
        if inst.state in (State.GONE, State.FAILED):
            raise ApiError(409, f"instance {instance_id} is {inst.state.value}", code="not_drainable")
        registry.drain(inst, (body or DrainBody()).deadline_s)
        return inst.describe()
