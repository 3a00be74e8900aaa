"""A TEST DOUBLE of the Kubernetes API server: exactly the calls the `kubernetes` membership backend
makes, served over real HTTP on loopback so the official `kubernetes` client talks to it unchanged.

No API server can run here. This double serves:
- `GET /api/v1/namespaces/{ns}/pods?labelSelector=...` (list) and the same with `watch=true`
  (newline-delimited watch events from `resourceVersion`, until `timeoutSeconds` or `drop_watches`);
- `GET` / `PATCH /apis/leaderworkerset.x-k8s.io/v1/namespaces/{ns}/leaderworkersets/{name}/scale`
  (a scale of 0 omits `replicas`, as the API server's JSON does).
A PATCH of a scale plays the LeaderWorkerSet controller: it adds leader pods for new groups (with
IPs from the list it was given, and a fresh uid) and deletes the highest groups. Label selectors
understand only what the backend sends: `key=value` and `key in (a,b)`. Everything else is a 404.

The faults tests set: `recreate` (a leader pod replaced under its name, with or without the
events a watch would carry), `hang_watches` (a watch that opens and then says nothing, as over a
half-open connection), `gone_once` (the next watch answers 410 Gone: its version is too old) and
`fail_lists` (the next pod lists answer 503).
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

LWS = "/apis/leaderworkerset.x-k8s.io/v1/namespaces/(?P<ns>[^/]+)/leaderworkersets/(?P<name>[^/]+)/scale"
PODS = "/api/v1/namespaces/(?P<ns>[^/]+)/pods"


def _matches(labels: dict[str, str], selector: str) -> bool:
    for term in re.split(r",(?![^()]*\))", selector):
        term = term.strip()
        if m := re.fullmatch(r"(\S+) in \((.*)\)", term):
            if labels.get(m.group(1)) not in [v.strip() for v in m.group(2).split(",")]:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
    return True


class KubeApiDouble:
    """Pods and LeaderWorkerSet scales in memory, with watch streams; tests drive it directly too."""

    def __init__(self, namespace: str, release: str, ips: list[str]):
        self.namespace, self.release = namespace, release
        self.free_ips = list(ips)
        self.pods: dict[str, dict] = {}
        self.replicas: dict[str, int] = {}
        self.events: list[tuple[int, str, dict]] = []
        self.version = 1
        self.calls: list[str] = []
        self.cond = threading.Condition()
        self.drop = 0
        self.hang_watches = False
        self.gone_once = False
        self.fail_lists = 0
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                double.handle(self, "GET")

            def do_PATCH(self) -> None:
                double.handle(self, "PATCH")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- what tests do -------------------------------------------------------------------------

    def add_lws(self, role: str, replicas: int) -> None:
        self.replicas[f"{self.release}-{role}"] = 0
        self.set_replicas(f"{self.release}-{role}", replicas)

    def set_replicas(self, lws: str, n: int) -> None:
        with self.cond:
            role = lws.removeprefix(f"{self.release}-")
            old = self.replicas[lws]
            self.replicas[lws] = n
            for group in range(old, n):
                self._put("ADDED", self._pod(role, lws, group))
            for group in range(n, old):
                pod = self.pods.pop(f"{lws}-{group}")
                self.free_ips.append(pod["status"]["podIP"])
                self._put("DELETED", pod)

    def recreate(self, name: str, announce: bool = True) -> str:
        """Replace a pod by a new one of the same name (new uid, new IP); `announce=False`: with no
        watch event, as when the events fell in a watch outage. Returns the new IP."""
        with self.cond:
            old = self.pods[name]
            labels = old["metadata"]["labels"]
            if announce:
                self._put("DELETED", old)
            self.free_ips.append(old["status"]["podIP"])
            pod = self._pod(labels["moeserve.io/role"], labels["leaderworkerset.sigs.k8s.io/name"],
                            int(labels["leaderworkerset.sigs.k8s.io/group-index"]))  # fmt: skip
            if announce:
                self._put("ADDED", pod)
            else:
                self.version += 1
                pod["metadata"]["resourceVersion"] = str(self.version)
            return pod["status"]["podIP"]

    def drop_watches(self) -> None:
        """Close every open watch stream, as a dropped connection or an API server restart would."""
        with self.cond:
            self.drop += 1
            self.cond.notify_all()

    def close(self) -> None:
        self.server.shutdown()

    # -- the API -------------------------------------------------------------------------------------

    def _pod(self, role: str, lws: str, group: int) -> dict:
        labels = {
            "app.kubernetes.io/instance": self.release,
            "moeserve.io/role": role,
            "leaderworkerset.sigs.k8s.io/name": lws,
            "leaderworkerset.sigs.k8s.io/group-index": str(group),
            "leaderworkerset.sigs.k8s.io/worker-index": "0",
        }
        name = f"{lws}-{group}"
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": labels,
                "uid": str(uuid.uuid4()),
            },
            "status": {"phase": "Running", "podIP": self.free_ips.pop(0)},
        }
        self.pods[name] = pod
        return pod

    def _put(self, kind: str, pod: dict) -> None:
        self.version += 1
        pod["metadata"]["resourceVersion"] = str(self.version)
        self.events.append((self.version, kind, json.loads(json.dumps(pod))))
        self.cond.notify_all()

    def handle(self, req: BaseHTTPRequestHandler, method: str) -> None:
        url = urlparse(req.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.calls.append(f"{method} {url.path}{' watch' if query.get('watch') == 'true' else ''}")
        if m := re.fullmatch(LWS, url.path):
            if m["name"] not in self.replicas:
                return self._send(req, 404, {"kind": "Status", "code": 404, "message": "not found"})
            if method == "PATCH":
                body = json.loads(req.rfile.read(int(req.headers.get("Content-Length", 0))))
                self.set_replicas(m["name"], int(body["spec"]["replicas"]))
            n = self.replicas[m["name"]]
            spec = {"replicas": n} if n else {}  # omitempty
            scale = {"apiVersion": "autoscaling/v1", "kind": "Scale", "metadata": {"name": m["name"]},
                     "spec": spec, "status": {"replicas": n}}  # fmt: skip
            return self._send(req, 200, scale)
        if method == "GET" and re.fullmatch(PODS, url.path):
            selector = query.get("labelSelector", "")
            if query.get("watch") == "true":
                timeout = float(query.get("timeoutSeconds") or 1800)
                return self._watch(req, selector, int(query.get("resourceVersion") or 0), timeout)
            with self.cond:
                if self.fail_lists:
                    self.fail_lists -= 1
                    return self._send(req, 503, {"kind": "Status", "code": 503, "message": "unavailable"})
                items = [p for p in self.pods.values() if _matches(p["metadata"]["labels"], selector)]
                meta = {"resourceVersion": str(self.version)}
                body = {"apiVersion": "v1", "kind": "PodList", "metadata": meta, "items": items}
            return self._send(req, 200, body)
        return self._send(req, 404, {"kind": "Status", "code": 404, "message": f"no route {url.path}"})

    def _send(self, req: BaseHTTPRequestHandler, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        req.send_response(status)
        req.send_header("Content-Type", "application/json")
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        req.wfile.write(data)

    def _watch(self, req: BaseHTTPRequestHandler, selector: str, since: int, timeout: float) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/json")
        req.send_header("Transfer-Encoding", "chunked")
        req.end_headers()
        with self.cond:
            drop, hang, gone = self.drop, self.hang_watches, self.gone_once
            self.gone_once = False
        sent, end = since, time.monotonic() + timeout

        def line(event: dict) -> None:
            data = json.dumps(event).encode() + b"\n"
            req.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            req.wfile.flush()

        try:
            if gone:
                status = {
                    "kind": "Status",
                    "code": 410,
                    "reason": "Expired",
                    "message": "too old resource version",
                }
                line({"type": "ERROR", "object": status})
            while not gone:
                with self.cond:
                    fresh = [] if hang else [e for e in self.events if e[0] > sent]
                    if not fresh:
                        self.cond.wait(timeout=0.2)
                        if self.drop != drop or (not hang and time.monotonic() > end):
                            break  # (a hanging watch ignores its timeout: only the client can end it)
                        continue
                for version, kind, pod in fresh:
                    sent = version
                    if _matches(pod["metadata"]["labels"], selector):
                        line({"type": kind, "object": pod})
            req.wfile.write(b"0\r\n\r\n")
            req.close_connection = True
        except (BrokenPipeError, ConnectionResetError):
            pass
