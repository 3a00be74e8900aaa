"""The KVHandoff gRPC service of a prefill instance (rank 0): Attach and Release, handed to the
DP rank that serves the room (see `services.kv.prefill` for what the rank does), and the routers'
FirstTokens feeds (`services.worker.front.first_token_feeds`)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from services.common.calls import CallError
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.proto.moeserve.v1 import kv_handoff_pb2_grpc as kvpb_grpc
from services.worker import messages as msg
from services.worker import proto_convert
from services.worker.faults import Refusals
from services.worker.front.dp_controller import DPController
from services.worker.front.first_token_feeds import FirstTokenFeeds
from services.worker.front.sglang_rpcs import abort_with

RELEASE_TIMEOUT_S = 20.0
"""Longer than a rank's wait for a room's writes to settle, shorter than decode's wait for us."""


class KVHandoffServicer(kvpb_grpc.KVHandoffServicer):
    """Decode ranks attach their pages to rooms here; prefill writes the prompt KV into them."""

    def __init__(self, controller: DPController, refusals: Refusals, feeds: FirstTokenFeeds):
        self.ctl, self.refusals, self.feeds = controller, refusals, feeds

    def Attach(self, request: kvpb.AttachRequest, context: grpc.ServicerContext) -> kvpb.AttachResponse:
        ctl = self.ctl
        forwarded = bool(request.forwarded_request)  # decode-first: this is the request's arrival here
        if forwarded and self.refusals.take():
            context.abort(grpc.StatusCode.UNAVAILABLE, Refusals.MESSAGE)
        pinned = request.prefill_dp_rank if request.HasField("prefill_dp_rank") else None
        try:
            rank = ctl.enter_room(request.room, lambda: ctl.place(pinned))
        except ValueError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if forwarded:  # it counts in the ranks' load as a Generate would
            ctl.started(rank)
        try:
            spec = proto_convert.attach_from_proto(request)
            call = ctl.call(rank, lambda cid: msg.Attach(cid, spec))
            if not context.add_callback(call.cancel):
                call.cancel()  # the caller went away before the callback was in place
            try:
                for value in call:  # a router's first token (decode-first with a feed), then the result
                    if isinstance(value, msg.FirstToken):
                        self.feeds.publish(spec.token_feed, value)
                    else:
                        return proto_convert.result_to_proto(value)
            except CallError as e:
                abort_with(context, e)
            context.abort(grpc.StatusCode.INTERNAL, f"prefill answered nothing for room {request.room}")
        finally:
            if forwarded:
                ctl.finished(rank)
            ctl.leave_room(request.room)

    def FirstTokens(
        self, request: kvpb.FirstTokensRequest, context: grpc.ServicerContext
    ) -> Iterator[kvpb.FirstTokenBatch]:
        feed = self.feeds.subscribe(request.feed)
        context.add_callback(feed.close)  # the router went: stop waiting at once
        try:
            yield kvpb.FirstTokenBatch()  # subscribed: the router may name this feed from now on
            for batch in feed.batches(context.is_active):
                yield proto_convert.first_tokens_to_proto(batch)
        finally:
            self.feeds.unsubscribe(request.feed, feed)

    def Release(self, request: kvpb.ReleaseRequest, context: grpc.ServicerContext) -> kvpb.ReleaseResponse:
        rank = self.ctl.room_rank(request.room)
        if rank is None:
            return kvpb.ReleaseResponse(released=False)
        call = self.ctl.call(rank, lambda cid: msg.Release(cid, request.room, request.reason))
        try:
            return kvpb.ReleaseResponse(released=bool(call.result(RELEASE_TIMEOUT_S)))
        except CallError as e:
            context.abort(grpc.StatusCode[e.code], e.message)
