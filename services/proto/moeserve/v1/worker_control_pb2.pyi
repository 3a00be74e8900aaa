from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RebalanceRequest(_message.Message):
    __slots__ = ("phy2log", "tolerance")
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    TOLERANCE_FIELD_NUMBER: _ClassVar[int]
    phy2log: _containers.RepeatedScalarFieldContainer[int]
    tolerance: float
    def __init__(self, phy2log: _Optional[_Iterable[int]] = ..., tolerance: _Optional[float] = ...) -> None: ...

class RebalanceResponse(_message.Message):
    __slots__ = ("version", "slots_changed", "balancedness_before", "balancedness_after")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SLOTS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_AFTER_FIELD_NUMBER: _ClassVar[int]
    version: int
    slots_changed: int
    balancedness_before: float
    balancedness_after: float
    def __init__(self, version: _Optional[int] = ..., slots_changed: _Optional[int] = ..., balancedness_before: _Optional[float] = ..., balancedness_after: _Optional[float] = ...) -> None: ...

class GetExpertLoadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayerExpertLoad(_message.Message):
    __slots__ = ("layer", "tokens_per_expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    tokens_per_expert: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., tokens_per_expert: _Optional[_Iterable[int]] = ...) -> None: ...

class GetExpertLoadResponse(_message.Message):
    __slots__ = ("num_experts", "top_k", "ep_size", "num_slots", "window_tokens", "window_steps", "layers", "phy2log", "placement_version")
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    EP_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    WINDOW_STEPS_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    PHY2LOG_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    num_experts: int
    top_k: int
    ep_size: int
    num_slots: int
    window_tokens: int
    window_steps: int
    layers: _containers.RepeatedCompositeFieldContainer[LayerExpertLoad]
    phy2log: _containers.RepeatedScalarFieldContainer[int]
    placement_version: int
    def __init__(self, num_experts: _Optional[int] = ..., top_k: _Optional[int] = ..., ep_size: _Optional[int] = ..., num_slots: _Optional[int] = ..., window_tokens: _Optional[int] = ..., window_steps: _Optional[int] = ..., layers: _Optional[_Iterable[_Union[LayerExpertLoad, _Mapping]]] = ..., phy2log: _Optional[_Iterable[int]] = ..., placement_version: _Optional[int] = ...) -> None: ...
