"""Instances as LeaderWorkerSet groups on Kubernetes, through the official `kubernetes` client.

Each role is one LeaderWorkerSet (`{release}-prefill`, `{release}-decode`); each of its groups is
one instance (an EP group over the group's pods), reached at its leader pod's IP on the role's
worker port. Pods are found by label — `moeserve.io/role`, `app.kubernetes.io/instance={release}`,
and LeaderWorkerSet's own `leaderworkerset.sigs.k8s.io/worker-index` (0 = leader) and
`group-index` — listed once, then watched. A leader pod with an IP adds its instance (`starting`
until its gRPC health says ready); a deleted leader removes it; a leader recreated under the same
name (another uid or IP) replaces its instance.

Every call has a client-side timeout, the watch's a little over its server-side one, so a
half-open connection ends too. A watch that ends or breaks (a dropped connection, 410 Gone) is
resumed from a fresh list of the pods and the sets' scales, which the event loop reconciles; a
failure waits 1 s, doubling up to 30 s. While the watch has been failing for longer than
`stale_after_s`, `problem()` says so and `/ready` answers 503 (0: never). Scaling patches the
role's LeaderWorkerSet `scale` subresource; scaling down drains the groups that will go
(LeaderWorkerSet removes the highest group indices) before patching. A scale without `replicas`
(omitted when 0) reads as 0.

The calls it makes, all standard client calls (what the chart's RBAC allows, and what the test
double in tests/doubles/kube_api.py serves):
- `CoreV1Api.list_namespaced_pod(namespace, label_selector=...)` and the same through
  `watch.Watch().stream(..., resource_version=..., timeout_seconds=...)`: pods list, watch;
- `CustomObjectsApi.get_namespaced_custom_object_scale` / `patch_namespaced_custom_object_scale`
  on `leaderworkerset.x-k8s.io/v1` `leaderworkersets`: leaderworkersets/scale get, patch.
"""

from __future__ import annotations

import asyncio
import logging
import random
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
WATCH_TIMEOUT_S = 120.0
"""The watch's server-side timeout; the client gives up on a silent stream 25% (plus 1 s) later."""
CALL_TIMEOUT_S = 15.0
"""Every other call's client-side timeout."""
BACKOFF_S = (1.0, 30.0)
"""After a failed watch or list: wait the first, doubling up to the second (with jitter)."""
STALE_AFTER_S = 120.0
STOP_WAIT_S = 2.0
"""How long `stop` waits for the watch thread (a daemon: one blocked in a read is left behind)."""
READY_TIMEOUT_S = 1800.0
"""Large groups take long to start (weights over many nodes); past this a starting one is failed."""


class Backend(Membership):
    name = "kubernetes"

    def __init__(
        self,
        registry: Registry,
        release: str,
        namespace: str = "default",
        port: int | dict[Role, int] = 30001,
        bootstrap_port: int | None = None,
        api_client: Any = None,
        ready_timeout_s: float = READY_TIMEOUT_S,
        watch_timeout_s: float = WATCH_TIMEOUT_S,
        stale_after_s: float = STALE_AFTER_S,
    ):
        """`api_client`: a `kubernetes.client.ApiClient` (default: in-cluster config, else kubeconfig);
        `port`: the workers' gRPC port, one for both roles or one per role."""
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
        self.release, self.namespace, self.bootstrap_port = release, namespace, bootstrap_port
        self.ports: dict[Role, int] = port if isinstance(port, dict) else dict.fromkeys(ROLES, port)
        self.ready_timeout_s, self.watch_timeout_s = ready_timeout_s, watch_timeout_s
        self.stale_after_s = stale_after_s
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
        self._failing_since: float | None = None
        self._last_error = ""

    def lws(self, role: Role) -> str:
        return f"{self.release}-{role}"

    def desired(self) -> dict[Role, int]:
        return dict(self.replicas)

    def check_scale(self, role: Role, count: int) -> None:
        if count < 0:
            raise ScaleError(f"{role} instances cannot be {count}")

    def problem(self) -> str | None:
        failing = self._failing_since
        if failing is None or not self.stale_after_s or time.monotonic() - failing < self.stale_after_s:
            return None
        return f"the pod watch has failed for {time.monotonic() - failing:.0f}s: {self._last_error}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        pods, replicas = await asyncio.to_thread(self._list)
        self._reconcile(pods.items, replicas)
        self._thread = threading.Thread(
            target=self._watch, args=(pods.metadata.resource_version,), name="k8s-watch", daemon=True
        )
        self._thread.start()
        self._task = asyncio.create_task(self._expire_starting())

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
        if self._thread is not None:  # between reads it sees the stop at once; inside one, it is left
            await asyncio.to_thread(self._thread.join, STOP_WAIT_S)

    # -- scaling -----------------------------------------------------------------------------------

    def _get_replicas(self, role: Role) -> int:
        scale = cast(  # the custom objects API returns the JSON object, typed `object`
            "dict[str, Any]",
            self.custom.get_namespaced_custom_object_scale(
                LWS_GROUP,
                LWS_VERSION,
                self.namespace,
                LWS_PLURAL,
                self.lws(role),
                _request_timeout=CALL_TIMEOUT_S,
            ),
        )
        return int((scale.get("spec") or {}).get("replicas") or 0)  # omitted when 0

    def _patch_replicas(self, role: Role, count: int) -> None:
        self.custom.patch_namespaced_custom_object_scale(
            LWS_GROUP, LWS_VERSION, self.namespace, LWS_PLURAL, self.lws(role), {"spec": {"replicas": count}},
            _request_timeout=CALL_TIMEOUT_S,
        )  # fmt: skip

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
        await asyncio.to_thread(self._patch_replicas, role, count)
        self.replicas[role] = count

    # -- discovery -----------------------------------------------------------------------------------

    def _list(self) -> tuple[Any, dict[Role, int]]:
        """The pods (read as Any, like the pods in `_on_pod`) and each set's replicas, now."""
        pods: Any = self.core.list_namespaced_pod(
            self.namespace, label_selector=self.selector, _request_timeout=CALL_TIMEOUT_S
        )
        return pods, {role: self._get_replicas(role) for role in ROLES}

    def _watch(self, resource_version: str) -> None:
        """The watch thread: stream pod events; whenever the stream ends, list again and resume."""
        from kubernetes import watch

        wait = BACKOFF_S[0]
        while not self._stop.is_set():
            self.watches_started += 1
            try:
                stream = watch.Watch().stream(  # type: ignore[no-untyped-call]  # unannotated upstream
                    self.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=self.selector,
                    resource_version=resource_version,
                    timeout_seconds=int(self.watch_timeout_s),
                    _request_timeout=(CALL_TIMEOUT_S, 1.25 * self.watch_timeout_s + 1),
                )
                for event in stream:
                    if self._stop.is_set():
                        return
                    self._post(event["type"], event["object"])
                    resource_version = event["object"].metadata.resource_version or resource_version
                pods, replicas = self._list()
            except Exception as e:  # a dropped or silent connection, a 410 Gone, a failed list
                self._failed(e)
                if self._stop.wait(wait * random.uniform(0.8, 1.2)):
                    return
                wait = min(2 * wait, BACKOFF_S[1])
                try:
                    pods, replicas = self._list()
                except Exception as e:
                    self._failed(e)
                    continue
            wait, self._failing_since = BACKOFF_S[0], None
            assert self._loop is not None
            self._loop.call_soon_threadsafe(self._reconcile, pods.items, replicas)
            resource_version = pods.metadata.resource_version

    def _failed(self, e: Exception) -> None:
        if self._stop.is_set():
            return  # stopping: the stream was cut under the thread
        self._last_error = f"{type(e).__name__}: {str(e)[:200]}"
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        log.warning("pod watch or list failed (%s); listing again", self._last_error)

    def _reconcile(self, pods: list[Any], replicas: dict[Role, int]) -> None:
        """A fresh list, on the event loop: leaders gone meanwhile leave, the rest are (re)added."""
        self.replicas.update(replicas)  # another replica or `kubectl scale` may have changed them
        seen = {p.metadata.name for p in pods}
        for name in [n for n in self.by_pod if n not in seen]:
            self._on_pod("DELETED", self.pods[name])
        for pod in pods:
            self._on_pod("MODIFIED", pod)

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
        ip = pod.status.pod_ip if pod.status is not None else None
        gone = kind == "DELETED" or pod.metadata.deletion_timestamp is not None
        if known is not None and not gone:
            before = self.pods[name]
            if before.metadata.uid == pod.metadata.uid and ip in (None, before.status.pod_ip):
                self.pods[name] = pod
                return
            self._remove(name, "its leader pod was recreated")  # a new pod under the old name
            known = None
        if gone:
            if known is not None:
                self._remove(name, "its leader pod was deleted")
            return
        if ip:
            role = labels[ROLE_LABEL]
            inst = self.registry.add(role, f"{ip}:{self.ports[role]}", self.bootstrap_port, id=name)
            self.by_pod[name], self.pods[name] = inst, pod
            self.groups[inst.id] = int(labels.get(GROUP_INDEX_LABEL, "0"))

    def _remove(self, name: str, why: str) -> None:
        inst = self.by_pod.pop(name)
        del self.pods[name], self.groups[inst.id]
        if inst.state not in (State.GONE, State.FAILED):
            inst.set_state(State.GONE, why)
        task = asyncio.ensure_future(self.registry.forget(inst))
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _expire_starting(self) -> None:
        """A group whose leader never turns healthy is failed (not routed; Kubernetes restarts it)."""
        while True:
            await asyncio.sleep(1.0)
            for inst in list(self.by_pod.values()):
                if inst.state == State.STARTING and time.monotonic() - inst.since > self.ready_timeout_s:
                    inst.set_state(State.FAILED, f"not healthy within {self.ready_timeout_s:.0f}s")
