"""Where the engine's work runs: a step's host inputs copied to the device in one copy, the device a
thread works on, and marks in the device's work queue that another thread can wait for.

The current CUDA device is per thread: every thread that queues device work or waits for it sets
it first (`use_in_thread`), or its kernels, events and communicators land on GPU 0.

A step's host-side inputs, in one copy:

The runner plans each step on the host (token ids, sequence lengths, page tables: NumPy, no
device involved); `to_device` packs those arrays into one int64 buffer and, on a GPU, copies it
from pinned memory without blocking the host (PyTorch's caching host allocator hands the same
pinned blocks back step after step, and keeps a block until the copy from it has run). The
arrays come out as views of the one device buffer. On the CPU nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch


def use_in_thread(device: torch.device | str) -> None:
    """Make `device` the calling thread's current CUDA device (nothing to do on the CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)


class DeviceMark:
    """A point in the calling thread's device work queue: `wait` returns once the device has done
    everything queued before the mark was made (a recorded CUDA event; on the CPU work is done when
    it is queued, so there is nothing to wait for)."""

    def __init__(self, device: torch.device) -> None:
        self._event: Any = None
        if device.type != "cpu":
            self._event = torch.cuda.Event()  # type: ignore[no-untyped-call]  # torch leaves it unannotated
            self._event.record()

    def wait(self) -> None:
        """Block the calling thread (never the device) until the marked work is done."""
        if self._event is not None:
            self._event.synchronize()


def to_device(
    arrays: Sequence[np.ndarray | Sequence[Any]], device: torch.device | str, dtype: Any = np.int64
) -> list[torch.Tensor]:
    """Arrays (any shapes) -> tensors of `dtype` (int64; float32 for parameters) and the same shapes
    on `device`, in one copy."""
    device = torch.device(device)
    packed = np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays])
    host = torch.from_numpy(packed)
    flat = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
    out, start = [], 0
    for a in arrays:
        size = int(np.size(a))
        out.append(flat[start : start + size].view(np.shape(a)))
        start += size
    return out
