"""A fake GPU on a machine without one: run the engine's device path and catch what a GPU would reject.

The stand-in device is PyTorch's `meta` device: its tensors have a device, a dtype and a shape but
no data, so every kernel is skipped while every shape and dtype rule is applied, and:

- a host synchronisation raises, as on a GPU it would stall: reading a value (`item`, `tolist`,
  `bool()`, `int()`), a copy to the host (`.cpu()`), and the ops whose output size depends on the
  data (`nonzero`, boolean masks, `bincount`, `unique`). The step's one allowed sync, the sampled
  tokens' copy (`services.engine.sampling.to_host`), is replaced by one that counts its calls and
  returns zeros of the right shapes;
- an op on a CPU tensor and a device tensor raises; `DeviceCheck` adds the cases meta lets pass but
  a GPU does not (a CPU table indexed with device ids);
- `torch.cuda` answers as a machine with GPUs would (`cuda_runtime`): `is_available`,
  `device_count`, `get_device_capability` (9.0), the current device per thread (`set_device`
  calls are recorded with their thread), `Event` (records and waits counted) and pinned memory.

Why not PyTorch's FakeTensorMode with `device="cuda"` (which the issue suggested)? In a CPU-only
build of torch its CUDA tensors cannot be indexed: `x[:, None]` goes through a CUDA device guard
and raises "PyTorch is not linked with support for cuda devices", and the model indexes on every
layer. The meta device indexes, and detects the same host syncs.

What it does not see: kernels (no data is computed), NCCL, DeepEP, stream ordering, and code that
branches on `device.type == "cuda"` (the product treats every device that is not the CPU alike).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import services.engine.sampling as sampling

GPU = torch.device("meta")
"""The device fake-GPU tests put the model on."""
CROSS_DEVICE_OPS = {"aten._to_copy.default", "aten.copy_.default"}
"""Ops whose purpose is to move data between devices."""


class DeviceMix(AssertionError):
    """One op took tensors on two devices (a GPU raises on it)."""


def _devices(args: Any) -> set[str]:
    found: set[str] = set()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            if x.dim() > 0 or x.device.type != "cpu":  # CPU scalars mix freely with device tensors
                found.add(x.device.type)
        elif isinstance(x, (list, tuple)):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(args)
    return found


class DeviceCheck(TorchDispatchMode):
    """Raises on an op that takes tensors on two devices (moving data between them aside)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        if str(func) not in CROSS_DEVICE_OPS:
            devices = _devices((args, kwargs))
            if len(devices) > 1:
                shapes = [(tuple(a.shape), a.device.type) for a in args if isinstance(a, torch.Tensor)]
                raise DeviceMix(f"{func} on tensors of several devices: {shapes}")
        return func(*args, **kwargs)


class FakeEvent:
    """torch.cuda.Event: counts its records and the waits on it, and the threads that waited."""

    made: ClassVar[list[FakeEvent]] = []

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.recorded = 0
        self.waited_in: list[str] = []
        FakeEvent.made.append(self)

    def record(self, stream: Any = None) -> None:
        self.recorded += 1

    def synchronize(self) -> None:
        assert self.recorded, "waited on an event that was never recorded"
        self.waited_in.append(threading.current_thread().name)

    def query(self) -> bool:
        return True


@dataclass
class FakeCuda:
    """What the faked CUDA runtime saw."""

    set_device: list[tuple[str, int]] = field(default_factory=list)
    """(thread name, device index) per `torch.cuda.set_device` call."""
    to_host_calls: int = 0
    """Calls of the step's one sync point (`sampling.to_host`)."""
    host_to_device: list[bool] = field(default_factory=list)
    """One entry per copy from the host to the device: True if it did not block the host."""
    events: list[FakeEvent] = field(default_factory=list)
    _current: threading.local = field(default_factory=threading.local)

    def current_device(self) -> int:
        return getattr(self._current, "index", 0)

    def record_set_device(self, device: int | str | torch.device) -> None:
        index = device if isinstance(device, int) else torch.device(device).index or 0
        self._current.index = index
        self.set_device.append((threading.current_thread().name, index))

    def devices_set_in(self, thread_name_prefix: str) -> set[int]:
        return {d for name, d in self.set_device if name.startswith(thread_name_prefix)}


@contextlib.contextmanager
def cuda_runtime(monkeypatch: Any) -> Iterator[FakeCuda]:
    """The `torch.cuda` answers of a machine with GPUs (no fake device): for threads and start-up."""
    log = FakeCuda()
    FakeEvent.made = log.events
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "current_device", log.current_device)
    monkeypatch.setattr(torch.cuda, "set_device", log.record_set_device)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: self)
    # Copies from the host to the device, as Python asks for them (a dispatch mode does not see
    # them all: under inference_mode `.to()` reaches no mode): did each leave the host free?
    to, tensor = torch.Tensor.to, torch.tensor

    def recorded_to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = to(self, *args, **kwargs)
        if self.device.type == "cpu" and out.device.type != "cpu":
            log.host_to_device.append(bool(kwargs.get("non_blocking", False)))
        return out

    def recorded_tensor(data: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = tensor(data, *args, **kwargs)
        if out.device.type != "cpu":
            log.host_to_device.append(False)  # from pageable memory: the host waits
        return out

    monkeypatch.setattr(torch.Tensor, "to", recorded_to)
    monkeypatch.setattr(torch, "tensor", recorded_tensor)
    yield log


@contextlib.contextmanager
def fake_gpu(monkeypatch: Any) -> Iterator[FakeCuda]:
    """The CUDA runtime's answers, the step's sync point counted, and the device check (see above);
    put the model on `GPU`."""
    with cuda_runtime(monkeypatch) as log:

        def to_host(*tensors: torch.Tensor) -> list[Any]:
            log.to_host_calls += 1
            return [torch.zeros(t.shape, dtype=t.dtype).tolist() for t in tensors]

        monkeypatch.setattr(sampling, "to_host", to_host)
        with DeviceCheck():
            yield log
