"""Proto messages <-> engine and KV types, in one place: SGLang's scheduler protocol and our KV hand-off."""

from __future__ import annotations

from smg_grpc_proto import sglang_scheduler_pb2 as pb
from smg_grpc_proto.generated import common_pb2

from services.engine import InvalidRequestError, RequestOutput, SamplingParams, TokenLogprob
from services.kv import AttachResult, AttachSpec, KVLayout
from services.proto.moeserve.v1 import kv_handoff_pb2 as kvpb
from services.worker import messages as msg


def request_params(request: pb.GenerateRequest, max_model_len: int) -> SamplingParams:
    """The engine's parameters for a Generate: its sampling parameters and whether it wants logprobs.

    `return_logprob` asks for each output token's log-probability, with `top_logprobs_num`
    alternatives; prompt log-probabilities (`logprob_start_len`) and `token_ids_logprob` are refused.
    """
    if request.return_logprob and request.token_ids_logprob:
        raise InvalidRequestError("token_ids_logprob is not supported; ask for top_logprobs_num instead")
    if request.return_logprob and request.logprob_start_len not in (0, -1):
        raise InvalidRequestError("prompt log-probabilities are not supported; send logprob_start_len=-1")
    logprobs = int(request.top_logprobs_num) if request.return_logprob else None
    return sampling_from_proto(
        request.sampling_params, len(request.tokenized.input_ids), max_model_len, logprobs
    )


def sampling_from_proto(
    sp: pb.SamplingParams, prompt_len: int, max_model_len: int, logprobs: int | None = None
) -> SamplingParams:
    """Proto3 zeros mean 'unset' here (the protocol's own note): top_p 0 -> 1, top_k <= 0 -> off.

    `max_new_tokens` unset means 'up to the context limit', as SGLang does.
    """
    if sp.n > 1:
        raise InvalidRequestError(f"n={sp.n} is not supported; send n=1")
    if sp.HasField("regex") or sp.HasField("json_schema") or sp.HasField("ebnf_grammar"):
        raise InvalidRequestError("constrained decoding (regex, json_schema, ebnf) is not supported")
    max_new = sp.max_new_tokens if sp.HasField("max_new_tokens") else max(1, max_model_len - prompt_len)
    return SamplingParams(
        max_tokens=int(max_new),
        temperature=float(sp.temperature),
        top_p=float(sp.top_p) if sp.top_p > 0 else 1.0,
        top_k=int(sp.top_k) if sp.top_k > 0 else 0,
        min_p=float(sp.min_p),
        seed=_seed(sp),
        stop_token_ids=tuple(sp.stop_token_ids),
        ignore_eos=bool(sp.ignore_eos),
        logprobs=logprobs,
    )


SEED_RANGE = (-(1 << 63), (1 << 63) - 1)


def _seed(sp: pb.SamplingParams) -> int | None:
    """`custom_params.seed`: a 64-bit integer, as decimal text (exact) or a whole number; anything
    else is the request's fault (INVALID_ARGUMENT), never the worker's."""
    if not (sp.HasField("custom_params") and "seed" in sp.custom_params.fields):
        return None
    value = sp.custom_params.fields["seed"]
    kind = value.WhichOneof("kind")
    try:
        if kind == "string_value":
            seed = int(value.string_value)
        elif kind == "number_value" and float(value.number_value).is_integer():
            seed = int(value.number_value)
        else:
            raise ValueError(kind)
    except (ValueError, OverflowError):
        raise InvalidRequestError(f"seed must be an integer, got {value!s:.60}") from None
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise InvalidRequestError(f"seed must be a 64-bit signed integer, got {str(seed)[:40]}")
    return seed


def chunk(out: RequestOutput, cached_tokens: int | None = None) -> pb.GenerateResponse:
    """A streamed chunk with the tokens the last step produced; `cached_tokens` (default: the
    output's own) are the prompt tokens found in the prefix cache of the rank that computed it."""
    return pb.GenerateResponse(
        request_id=out.request_id,
        chunk=pb.GenerateStreamChunk(
            token_ids=out.new_token_ids,
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=len(out.output_token_ids),
            cached_tokens=out.cached_tokens if cached_tokens is None else cached_tokens,
            output_logprobs=output_logprobs(out.new_token_ids, out.new_logprobs),
        ),
    )


def complete(out: RequestOutput, cached_tokens: int | None = None) -> pb.GenerateResponse:
    """The final message of a Generate: every output token and why it stopped."""
    done = pb.GenerateComplete(
        output_ids=out.output_token_ids,
        finish_reason=out.finish_reason or "abort",
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(out.output_token_ids),
        cached_tokens=out.cached_tokens if cached_tokens is None else cached_tokens,
        output_logprobs=output_logprobs(out.output_token_ids, out.output_logprobs),
    )
    if out.finish_reason == "stop" and out.output_token_ids:
        done.matched_token_id = out.output_token_ids[-1]
    return pb.GenerateResponse(request_id=out.request_id, complete=done)


def prefill_complete(request_id: str, prompt: list[int], res: AttachResult) -> pb.GenerateResponse:
    """A prefill's whole answer to a disaggregated Generate: the first token, once its KV is in the
    decode pages."""
    first_lp = [res.first_logprob] if res.first_logprob is not None else []
    out = RequestOutput(
        request_id, prompt, [res.first_token_id], "length",
        cached_tokens=res.cached_tokens, output_logprobs=first_lp,
    )  # fmt: skip
    return complete(out)


def output_logprobs(token_ids: list[int], logprobs: list[TokenLogprob]) -> pb.OutputLogProbs | None:
    """SGLang's per-token log-probabilities (None when the request did not ask for them)."""
    if not logprobs:
        return None
    return pb.OutputLogProbs(
        token_logprobs=[lp.logprob for lp in logprobs],
        token_ids=token_ids,
        top_logprobs=[top_logprobs(lp.top) for lp in logprobs],
    )


def top_logprobs(top: tuple[tuple[int, float], ...]) -> pb.TopLogProbs:
    return pb.TopLogProbs(token_ids=[t for t, _ in top], values=[v for _, v in top])


def layout_to_proto(layout: KVLayout) -> kvpb.KVLayout:
    return kvpb.KVLayout(
        architecture=layout.architecture,
        num_layers=layout.num_layers,
        entry_shape=list(layout.entry_shape),
        dtype=layout.dtype,
        page_size=layout.page_size,
        fingerprint=layout.fingerprint,
    )


def layout_from_proto(msg: kvpb.KVLayout) -> KVLayout:
    return KVLayout(msg.architecture, msg.num_layers, tuple(msg.entry_shape), msg.dtype, msg.page_size)


def attach_to_proto(spec: AttachSpec) -> kvpb.AttachRequest:
    return kvpb.AttachRequest(
        room=spec.room,
        request_id=spec.request_id,
        layout=layout_to_proto(spec.layout),
        transfer_session=spec.transfer_session,
        kv_base_address=spec.kv_base,
        layer_stride_bytes=spec.layer_stride,
        page_ids=list(spec.page_ids),
        num_prompt_tokens=spec.num_prompt_tokens,
        forwarded_request=spec.forwarded,
        prefill_dp_rank=spec.prefill_rank,
        token_feed=spec.token_feed,
    )


def attach_from_proto(msg: kvpb.AttachRequest) -> AttachSpec:
    return AttachSpec(
        room=msg.room,
        request_id=msg.request_id,
        layout=layout_from_proto(msg.layout),
        transfer_session=msg.transfer_session,
        kv_base=msg.kv_base_address,
        layer_stride=msg.layer_stride_bytes,
        page_ids=tuple(msg.page_ids),
        num_prompt_tokens=msg.num_prompt_tokens,
        forwarded=msg.forwarded_request,
        prefill_rank=msg.prefill_dp_rank if msg.HasField("prefill_dp_rank") else None,
        token_feed=msg.token_feed,
    )


def result_to_proto(res: AttachResult) -> kvpb.AttachResponse:
    msg = kvpb.AttachResponse(
        first_token_id=res.first_token_id,
        prompt_tokens=res.prompt_tokens,
        cached_tokens=res.cached_tokens,
        transferred_bytes=res.transferred_bytes,
    )
    if (lp := res.first_logprob) is not None:
        msg.first_token_logprob = lp.logprob
        msg.first_top_token_ids.extend(t for t, _ in lp.top)
        msg.first_top_logprobs.extend(v for _, v in lp.top)
    return msg


def result_from_proto(msg: kvpb.AttachResponse) -> AttachResult:
    first = None
    if msg.HasField("first_token_logprob"):
        top = zip(msg.first_top_token_ids, msg.first_top_logprobs, strict=True)
        first = TokenLogprob(msg.first_token_logprob, tuple(top))
    return AttachResult(
        msg.first_token_id, msg.prompt_tokens, msg.cached_tokens, msg.transferred_bytes, first
    )


def kv_event(event: msg.KvEvent, block_size: int) -> common_pb2.KvCacheEvent:
    """A prefix-cache event as SGLang's KvCacheEvent (block hashes: `services.common.prefix_hash`)."""
    out = common_pb2.KvCacheEvent(event_id=event.seq)
    if event.kind == "stored":
        out.stored.blocks.extend(
            common_pb2.KvBlock(block_hash=h, block_size=block_size) for h in event.hashes
        )
        if event.parent:
            out.stored.parent_block_hash = event.parent
    elif event.kind == "removed":
        out.removed.block_hashes.extend(event.hashes)
    else:
        out.cleared.SetInParent()
    return out


def first_tokens_to_proto(batch: list[msg.FirstToken]) -> kvpb.FirstTokenBatch:
    return kvpb.FirstTokenBatch(
        tokens=[
            kvpb.FirstToken(
                room=t.room,
                request_id=t.request_id,
                token_id=t.token_id,
                prompt_tokens=t.prompt_tokens,
                cached_tokens=t.cached_tokens,
            )
            for t in batch
        ]
    )
