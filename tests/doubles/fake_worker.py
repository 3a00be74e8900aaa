"""A TEST DOUBLE of a worker for the HTTP fuzzing test: SGLang's scheduler service over real gRPC on
loopback, answering at once with a few fixed tokens (no model), in a thread of the test process.

It serves what the orchestrator calls: HealthCheck, GetLoads, GetModelInfo, GetServerInfo (no
decode-first: the orchestrator dispatches to both, SGLang's way), Generate and Abort. A Generate
whose `top_k` is `REFUSED_TOP_K` is refused with INVALID_ARGUMENT, as a worker refuses a request it
cannot serve; every Generate is counted by request id.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

CONTEXT = 4096
REFUSED_TOP_K = 7
TOKENS = (20, 21, 22)


class FakeWorker(pb_grpc.SglangSchedulerServicer):
    def __init__(self, role: str, vocab: int):
        self.role, self.vocab = role, vocab
        self.generates: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
        pb_grpc.add_SglangSchedulerServicer_to_server(self, self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(grace=None)

    def HealthCheck(self, request, context) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(healthy=True, message="ok")

    def GetLoads(self, request, context) -> pb.GetLoadsResponse:
        return pb.GetLoadsResponse(loads=[pb.SchedulerLoad(dp_rank=0, max_total_num_tokens=100_000)])

    def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            model_path="fake",
            max_context_length=CONTEXT,
            max_req_input_len=CONTEXT - 1,
            vocab_size=self.vocab,
        )

    def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        info = pb.GetServerInfoResponse()
        info.server_args.update({"max_running_requests": 256})
        return info

    def Abort(self, request, context) -> pb.AbortResponse:
        return pb.AbortResponse(success=True, message="aborted")

    def Generate(self, request, context) -> Iterator[pb.GenerateResponse]:
        with self._lock:
            self.generates[request.request_id] += 1
        sp = request.sampling_params
        if sp.top_k == REFUSED_TOP_K:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"this worker refuses top_k={REFUSED_TOP_K}")
        prompt = len(request.tokenized.input_ids)
        want = sp.max_new_tokens if sp.HasField("max_new_tokens") else len(TOKENS)
        out = list(TOKENS[: max(1, min(want, len(TOKENS)))]) if self.role == "decode" else [TOKENS[0]]
        reason = "length" if len(out) >= want else "stop"
        if self.role == "decode":
            for i, token in enumerate(out):
                chunk = pb.GenerateStreamChunk(
                    token_ids=[token], prompt_tokens=prompt, completion_tokens=i + 1
                )
                yield pb.GenerateResponse(request_id=request.request_id, chunk=chunk)
        done = pb.GenerateComplete(
            output_ids=out, finish_reason=reason, prompt_tokens=prompt, completion_tokens=len(out)
        )
        yield pb.GenerateResponse(request_id=request.request_id, complete=done)
