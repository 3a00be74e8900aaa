"""The reference MoE engine: paged KV cache, continuous batching, chunked prefill, sampling."""

from services.engine.config import EngineConfig, EngineConfigError
from services.engine.engine import Engine
from services.engine.page_pool import KVStats
from services.engine.request import InvalidRequestError, RequestOutput
from services.engine.sampling import SamplingParams, SamplingParamsError, TokenLogprob

__all__ = [
    "Engine",
    "EngineConfig",
    "EngineConfigError",
    "InvalidRequestError",
    "KVStats",
    "RequestOutput",
    "SamplingParams",
    "SamplingParamsError",
    "TokenLogprob",
]
