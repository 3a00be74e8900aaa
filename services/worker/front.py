"""The public face of an expert-parallel instance, on rank 0.

Every rank runs a full worker on a private loopback port; the front serves the instance's public
port and routes: a Generate goes to the DP rank the caller pinned (`data_parallel_rank`) or to the
least loaded one; on a prefill instance a bootstrap room's Generate and Attach go to the same
rank, whichever arrives first. Load, health and expert statistics are gathered from all ranks.
KV pages still move rank to rank: the Attach carries the decode rank's own transfer session.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker.servicer import UNIMPLEMENTED_RPCS, unimplemented_rpc

INFO_TIMEOUT_S = 5.0


class _Rank:
    def __init__(self, index: int, address: str):
        self.index, self.address = index, address
        channel = grpc.insecure_channel(address)
        self.scheduler = pb_grpc.SglangSchedulerStub(channel)
        self.handoff = kvpb_grpc.KVHandoffStub(channel)
        self.control = ctl_grpc.WorkerControlStub(channel)
        self.inflight = 0


class Front(pb_grpc.SglangSchedulerServicer, kvpb_grpc.KVHandoffServicer, ctl_grpc.WorkerControlServicer):
    locals().update({name: unimplemented_rpc(name) for name in UNIMPLEMENTED_RPCS})

    def __init__(self, rank_addresses: list[str]):
        self.ranks = [_Rank(i, a) for i, a in enumerate(rank_addresses)]
        self._lock = threading.RLock()  # _enter_room picks a rank while holding it
        self._rr = itertools.count()
        self._rooms: dict[int, list[int]] = {}
        """bootstrap room -> [rank index, calls in flight] (prefill instances)."""

    # -- placement -------------------------------------------------------------------------------

    def _pick(self, request: pb.GenerateRequest, context) -> _Rank:
        if request.HasField("data_parallel_rank"):
            r = request.data_parallel_rank
            if not 0 <= r < len(self.ranks):
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"data_parallel_rank {r} is out of range; this instance has {len(self.ranks)} DP ranks",
                )
            return self.ranks[r]
        with self._lock:
            low = min(r.inflight for r in self.ranks)
            candidates = [r for r in self.ranks if r.inflight == low]
            return candidates[next(self._rr) % len(candidates)]

    def _enter_room(self, room: int, choose) -> _Rank:
        with self._lock:
            entry = self._rooms.get(room)
            if entry is None:
                entry = self._rooms[room] = [choose().index, 0]
            entry[1] += 1
            return self.ranks[entry[0]]

    def _leave_room(self, room: int) -> None:
        with self._lock:
            entry = self._rooms.get(room)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._rooms[room]

    # -- SglangScheduler -------------------------------------------------------------------------

    def Generate(self, request: pb.GenerateRequest, context) -> Iterator[pb.GenerateResponse]:
        room = (
            request.disaggregated_params.bootstrap_room if request.HasField("disaggregated_params") else None
        )
        if room is not None and request.disaggregated_params.bootstrap_host:
            rank = self._enter_room(room, lambda: self._pick(request, context))
        else:
            room, rank = None, self._pick(request, context)
        with self._lock:
            rank.inflight += 1
        try:
            call = rank.scheduler.Generate(request, timeout=context.time_remaining())
            context.add_callback(call.cancel)
            try:
                yield from call
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED or context.is_active():
                    context.abort(e.code(), f"DP rank {rank.index}: {e.details()}")
        finally:
            with self._lock:
                rank.inflight -= 1
            if room is not None:
                self._leave_room(room)

    def Abort(self, request, context) -> pb.AbortResponse:
        found = False
        for rank in self.ranks:
            with contextlib.suppress(grpc.RpcError):
                found |= rank.scheduler.Abort(request, timeout=INFO_TIMEOUT_S).success
        return pb.AbortResponse(
            success=found, message="aborted" if found else f"no live request {request.request_id!r}"
        )

    def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        for rank in self.ranks:
            try:
                res = rank.scheduler.HealthCheck(request, timeout=2.0)
            except grpc.RpcError as e:
                return pb.HealthCheckResponse(
                    healthy=False, message=f"EP rank {rank.index} unreachable: {e.code().name}"
                )
            if not res.healthy:
                return pb.HealthCheckResponse(healthy=False, message=f"EP rank {rank.index}: {res.message}")
        return pb.HealthCheckResponse(healthy=True, message=f"ok ({len(self.ranks)} ranks)")

    def GetModelInfo(self, request, context):
        return self._first(lambda r: r.scheduler.GetModelInfo(request, timeout=INFO_TIMEOUT_S), context)

    def GetTokenizer(self, request, context):
        yield from self._first(
            lambda r: list(r.scheduler.GetTokenizer(request, timeout=INFO_TIMEOUT_S)), context
        )

    def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        infos = [
            self._call(lambda r=r: r.scheduler.GetServerInfo(request, timeout=INFO_TIMEOUT_S), context)
            for r in self.ranks
        ]
        info = infos[0]
        info.server_args.update(
            {
                "ep_size": len(self.ranks),
                "dp_size": len(self.ranks),
                "rank_pids": [i.server_args["pid"] for i in infos],
            }
        )
        info.active_requests = sum(i.active_requests for i in infos)
        return info

    def GetLoads(self, request, context) -> pb.GetLoadsResponse:
        out = pb.GetLoadsResponse(dp_rank_count=len(self.ranks))
        agg = out.aggregate
        for rank in self.ranks:
            if request.HasField("dp_rank") and request.dp_rank != rank.index:
                continue
            res = self._call(
                lambda r=rank: r.scheduler.GetLoads(pb.GetLoadsRequest(), timeout=INFO_TIMEOUT_S), context
            )
            out.timestamp, out.version = res.timestamp, res.version
            for load in res.loads:
                load.dp_rank = rank.index
                out.loads.append(load)
                agg.total_running_reqs += load.num_running_reqs
                agg.total_waiting_reqs += load.num_waiting_reqs
                agg.total_reqs += load.num_total_reqs
        if out.loads:
            agg.avg_token_usage = sum(ld.token_usage for ld in out.loads) / len(out.loads)
        return out

    # -- KVHandoff (prefill instances) -------------------------------------------------------------

    def Attach(self, request: kvpb.AttachRequest, context) -> kvpb.AttachResponse:
        rank = self._enter_room(request.room, lambda: self._pick(pb.GenerateRequest(), context))
        try:
            call = rank.handoff.Attach.future(request, timeout=context.time_remaining())
            context.add_callback(call.cancel)
            try:
                return call.result()
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())
        finally:
            self._leave_room(request.room)

    def Release(self, request: kvpb.ReleaseRequest, context) -> kvpb.ReleaseResponse:
        with self._lock:
            entry = self._rooms.get(request.room)
        if entry is None:
            return kvpb.ReleaseResponse(released=False)
        return self._call(lambda: self.ranks[entry[0]].handoff.Release(request, timeout=30.0), context)

    # -- WorkerControl ---------------------------------------------------------------------------

    def GetExpertLoad(self, request, context) -> ctl.GetExpertLoadResponse:
        total: ctl.GetExpertLoadResponse | None = None
        for rank in self.ranks:
            res = self._call(lambda r=rank: r.control.GetExpertLoad(request, timeout=INFO_TIMEOUT_S), context)
            if total is None:
                total = res
                continue
            total.window_tokens += res.window_tokens
            total.window_steps = max(total.window_steps, res.window_steps)
            for mine, theirs in zip(total.layers, res.layers, strict=True):
                mine.tokens_per_expert[:] = [
                    a + b for a, b in zip(mine.tokens_per_expert, theirs.tokens_per_expert, strict=True)
                ]
        return total

    # -- helpers ---------------------------------------------------------------------------------

    def _call(self, fn, context):
        try:
            return fn()
        except grpc.RpcError as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"EP instance rank unreachable: {e.details()}")

    def _first(self, fn, context):
        return self._call(lambda: fn(self.ranks[0]), context)
