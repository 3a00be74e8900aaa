"""SGLang scheduler protocol messages <-> engine types."""

from __future__ import annotations

from smg_grpc_proto import sglang_scheduler_pb2 as pb

from services.engine import InvalidRequestError, RequestOutput, SamplingParams


def sampling_params(sp: pb.SamplingParams, prompt_len: int, max_model_len: int) -> SamplingParams:
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
    )


def _seed(sp: pb.SamplingParams) -> int | None:
    if sp.HasField("custom_params") and "seed" in sp.custom_params.fields:
        value = sp.custom_params.fields["seed"]
        if value.WhichOneof("kind") == "number_value":
            return int(value.number_value)
    return None


def chunk(out: RequestOutput, cached_tokens: int = 0) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=out.request_id,
        chunk=pb.GenerateStreamChunk(
            token_ids=out.new_token_ids,
            prompt_tokens=len(out.prompt_token_ids),
            completion_tokens=len(out.output_token_ids),
            cached_tokens=cached_tokens,
        ),
    )


def complete(out: RequestOutput, cached_tokens: int = 0) -> pb.GenerateResponse:
    done = pb.GenerateComplete(
        output_ids=out.output_token_ids,
        finish_reason=out.finish_reason or "abort",
        prompt_tokens=len(out.prompt_token_ids),
        completion_tokens=len(out.output_token_ids),
        cached_tokens=cached_tokens,
    )
    if out.finish_reason == "stop" and out.output_token_ids:
        done.matched_token_id = out.output_token_ids[-1]
    return pb.GenerateResponse(request_id=out.request_id, complete=done)
