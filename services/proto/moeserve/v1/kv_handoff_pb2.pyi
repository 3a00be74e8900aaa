from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KVLayout(_message.Message):
    __slots__ = ("architecture", "num_layers", "entry_shape", "dtype", "page_size", "fingerprint")
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    num_layers: int
    entry_shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    page_size: int
    fingerprint: str
    def __init__(self, architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., entry_shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., page_size: _Optional[int] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("room", "request_id", "layout", "transfer_session", "kv_base_address", "layer_stride_bytes", "page_ids", "num_prompt_tokens", "forwarded_request", "prefill_dp_rank", "token_feed")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SESSION_FIELD_NUMBER: _ClassVar[int]
    KV_BASE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LAYER_STRIDE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORWARDED_REQUEST_FIELD_NUMBER: _ClassVar[int]
    PREFILL_DP_RANK_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FEED_FIELD_NUMBER: _ClassVar[int]
    room: int
    request_id: str
    layout: KVLayout
    transfer_session: str
    kv_base_address: int
    layer_stride_bytes: int
    page_ids: _containers.RepeatedScalarFieldContainer[int]
    num_prompt_tokens: int
    forwarded_request: bytes
    prefill_dp_rank: int
    token_feed: str
    def __init__(self, room: _Optional[int] = ..., request_id: _Optional[str] = ..., layout: _Optional[_Union[KVLayout, _Mapping]] = ..., transfer_session: _Optional[str] = ..., kv_base_address: _Optional[int] = ..., layer_stride_bytes: _Optional[int] = ..., page_ids: _Optional[_Iterable[int]] = ..., num_prompt_tokens: _Optional[int] = ..., forwarded_request: _Optional[bytes] = ..., prefill_dp_rank: _Optional[int] = ..., token_feed: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("first_token_id", "prompt_tokens", "cached_tokens", "transferred_bytes", "first_token_logprob", "first_top_token_ids", "first_top_logprobs")
    FIRST_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRANSFERRED_BYTES_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    first_token_id: int
    prompt_tokens: int
    cached_tokens: int
    transferred_bytes: int
    first_token_logprob: float
    first_top_token_ids: _containers.RepeatedScalarFieldContainer[int]
    first_top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, first_token_id: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ..., transferred_bytes: _Optional[int] = ..., first_token_logprob: _Optional[float] = ..., first_top_token_ids: _Optional[_Iterable[int]] = ..., first_top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("room", "reason")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    room: int
    reason: str
    def __init__(self, room: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class FirstTokensRequest(_message.Message):
    __slots__ = ("feed",)
    FEED_FIELD_NUMBER: _ClassVar[int]
    feed: str
    def __init__(self, feed: _Optional[str] = ...) -> None: ...

class FirstToken(_message.Message):
    __slots__ = ("room", "request_id", "token_id", "prompt_tokens", "cached_tokens")
    ROOM_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    room: int
    request_id: str
    token_id: int
    prompt_tokens: int
    cached_tokens: int
    def __init__(self, room: _Optional[int] = ..., request_id: _Optional[str] = ..., token_id: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class FirstTokenBatch(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[FirstToken]
    def __init__(self, tokens: _Optional[_Iterable[_Union[FirstToken, _Mapping]]] = ...) -> None: ...
