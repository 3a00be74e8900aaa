"""Instances as LeaderWorkerSet groups on Kubernetes, through the official `kubernetes` client.

Each role is one LeaderWorkerSet (`{release}-prefill`, `{release}-decode`); each of its groups is
one instance (an EP group over the group's pods), reached at its leader pod's IP on the worker
port. Pods are found by label — `moeserve.io/role`, `app.kubernetes.io/instance={release}`, and
LeaderWorkerSet's own `leaderworkerset.sigs.k8s.io/worker-index` (0 = leader) and `group-index`
— listed once, then watched; a watch that ends or breaks is resumed from a fresh list. A leader
pod with an IP adds its instance (`starting` until its gRPC health says ready); a deleted leader
removes it. Scaling patches the role's LeaderWorkerSet `scale` subresource; scaling down drains
the groups that will go (LeaderWorkerSet removes the highest group indices) before patching.

The calls it makes, all standard client calls (what the RBAC below must allow, and what the
test double in tests/doubles/kube_api.py serves):
- `CoreV1Api.list_namespaced_pod(namespace, label_selector=...)` and the same through
  `watch.Watch().stream(..., resource_version=..., timeout_seconds=...)`: pods get, list, watch;
- `CustomObjectsApi.get_namespaced_custom_object_scale` / `patch_namespaced_custom_object_scale`
  on `leaderworkerset.x-k8s.io/v1` `leaderworkersets`: leaderworkersets/scale get, patch.

RBAC (namespaced Role): pods [get, list, watch]; leaderworkersets/scale [get, patch, update].
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, cast

from orchestrator.fleet.membership import Membership, ScaleError
from orchestrator.fleet.registry import Instance, Registry, State
from services.common.roles import ROLES, Role

log = logging.getLogger(__name__)
LWS_GROUP, LWS_VERSION, LWS_PLURAL = "leaderworkerset.x-k8s.io", "v1", "leaderworkersets"
ROLE_LABEL = "moeserve.io/role"
RELEASE_LABEL = "app.kubernetes.io/instance"
WORKER_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/worker-index"
GROUP_INDEX_LABEL = "leaderworkerset.sigs.k8s.io/group-index"
WATCH_TIMEOUT_S = 300
RESUME_AFTER_S = 1.0
READY_TIMEOUT_S = 1800.0
"""Large groups take long to start (weights over many nodes); past this a starting one is failed."""


class Backend(Membership):
    name = "kubernetes"

    def __init__(
        self,
        registry: Registry,
        release: str,
        namespace: str = "default",
        port: int = 30001,
        bootstrap_port: int | None = None,
        api_client: Any = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
    ):
        """`api_client`: a `kubernetes.client.ApiClient` (default: in-cluster config, else kubeconfig)."""
        super().__init__(registry)
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]  # unannotated upstream
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]  # unannotated upstream
            api_client = client.ApiClient()
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.release, self.namespace, self.port, self.bootstrap_port = (
            release,
            namespace,
            port,
            bootstrap_port,
        )
        self.ready_timeout_s = ready_timeout_s
        self.selector = f"{RELEASE_LABEL}={release},{ROLE_LABEL} in (prefill,decode)"
        self.by_pod: dict[str, Instance] = {}
        """Leader pod name -> its instance (the instance id is the pod's name)."""
        self.pods: dict[str, Any] = {}
        self.groups: dict[str, int] = {}
        """Instance id -> its LeaderWorkerSet group index."""
        self.replicas: dict[Role, int] = {role: 0 for role in ROLES}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._task: asyncio.Task[None] | None = None
        self._forgetting: set[asyncio.Future[None]] = set()
        self.watches_started = 0
        """How many watches were opened (the first, plus one per resume)."""

    def lws(self, role: Role) -> str:
        return f"{self.release}-{role}"

    def desired(self) -> dict[Role, int]:
        return dict(self.replicas)

    def check_scale(self, role: Role, count: int) -> None:
        if count < 0:
            raise ScaleError(f"{role} instances cannot be {count}")

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for role in ROLES:
            self.replicas[role] = await asyncio.to_thread(self._get_replicas, role)
        pods: Any = await asyncio.to_thread(  # read as Any, like the pods in `_on_pod`
            self.core.list_namespaced_pod, self.namespace, label_selector=self.selector
        )
        for pod in pods.items:
            self._on_pod("ADDED", pod)
        self._thread = threading.Thread(
            target=self._watch, args=(pods.metadata.resource_version,), name="k8s-watch", daemon=True
        )
        self._thread.start()
        self._task = asyncio.create_task(self._expire_starting())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()

    # -- scaling -----------------------------------------------------------------------------------

    def _get_replicas(self, role: Role) -> int:
        scale = cast(  # the custom objects API returns the JSON object, typed `object`
            "dict[str, Any]",
            self.custom.get_namespaced_custom_object_scale(
                LWS_GROUP, LWS_VERSION, self.namespace, LWS_PLURAL, self.lws(role)
            ),
        )
        return int(scale["spec"]["replicas"])

    def _patch_replicas(self, role: Role, count: int) -> None:
        self.custom.patch_namespaced_custom_object_scale(
            LWS_GROUP, LWS_VERSION, self.namespace, LWS_PLURAL, self.lws(role), {"spec": {"replicas": count}}
        )

    async def scale(self, role: Role, count: int) -> None:
        self.check_scale(role, count)
        current = self.replicas[role]
        if count < current:  # drain the groups LeaderWorkerSet will delete: the highest indices
            going = [
                i
                for i in self.registry.of(role)
                if self.groups.get(i.id, 0) >= count and i.state != State.GONE
            ]
            await asyncio.gather(*(self.registry.drain(i) for i in going))
        self.replicas[role] = count
        await asyncio.to_thread(self._patch_replicas, role, count)

    # -- discovery -----------------------------------------------------------------------------------

    def _watch(self, resource_version: str) -> None:
        """The watch thread: stream pod events, resume from a fresh list whenever the stream ends."""
        from kubernetes import watch

        while not self._stop.is_set():
            self.watches_started += 1
            try:
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]  # unannotated upstream
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=resource_version,
                    timeout_seconds=WATCH_TIMEOUT_S,
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    self._post(event["type"], event["object"])
                    resource_version = event["object"].metadata.resource_version or resource_version
            except Exception as e:  # a dropped connection, a 410 Gone: list again and resume
                log.warning("pod watch ended (%s); listing again", e)
            if self._stop.wait(RESUME_AFTER_S):
                return
            try:
                pods: Any = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector)
            except Exception as e:
                log.warning("pod list failed (%s); retrying", e)
                continue
            seen = {p.metadata.name for p in pods.items}
            for name in list(self.by_pod):
                if name not in seen:
                    self._post("DELETED", self.pods[name])
            for pod in pods.items:
                self._post("MODIFIED", pod)
            resource_version = pods.metadata.resource_version

    def _post(self, kind: str, pod: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._on_pod, kind, pod)

    def _on_pod(self, kind: str, pod: Any) -> None:
        """A pod event, on the event loop: leaders with an IP are instances; the rest is ignored."""
        labels = pod.metadata.labels or {}
        if labels.get(WORKER_INDEX_LABEL, "0") != "0" or labels.get(ROLE_LABEL) not in ROLES:
            return
        name = pod.metadata.name
        known = self.by_pod.get(name)
        if kind == "DELETED" or pod.metadata.deletion_timestamp is not None:
            if known is not None:
                del self.by_pod[name], self.pods[name], self.groups[known.id]
                if known.state not in (State.GONE, State.FAILED):
                    known.set_state(State.GONE, "its leader pod was deleted")
                task = asyncio.ensure_future(self.registry.forget(known))
                self._forgetting.add(task)
                task.add_done_callback(self._forgetting.discard)
            return
        ip = pod.status.pod_ip if pod.status is not None else None
        if known is None and ip:
            inst = self.registry.add(labels[ROLE_LABEL], f"{ip}:{self.port}", self.bootstrap_port, id=name)
            self.by_pod[name], self.pods[name] = inst, pod
            self.groups[inst.id] = int(labels.get(GROUP_INDEX_LABEL, "0"))
        elif known is not None:
            self.pods[name] = pod

    async def _expire_starting(self) -> None:
        """A group whose leader never turns healthy is failed (not routed; Kubernetes restarts it)."""
        while True:
            await asyncio.sleep(1.0)
            for inst in list(self.by_pod.values()):
                if inst.state == State.STARTING and time.monotonic() - inst.since > self.ready_timeout_s:
                    inst.set_state(State.FAILED, f"not healthy within {self.ready_timeout_s:.0f}s")
