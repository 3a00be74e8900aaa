"""A step's host-side inputs to the device in one copy.

The runner plans each step on the host (token ids, sequence lengths, page tables: NumPy, no
device involved); `to_device` packs those arrays into one int64 buffer and, on a GPU, copies it
from pinned memory without blocking the host (PyTorch's caching host allocator hands the same
pinned blocks back step after step, and keeps a block until the copy from it has run). The
arrays come out as views of the one device buffer. On the CPU nothing is copied.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def to_device(arrays: Sequence[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """Integer arrays (any shapes) -> int64 tensors of the same shapes on `device`, one copy."""
    device = torch.device(device)
    packed = np.concatenate([np.asarray(a, dtype=np.int64).reshape(-1) for a in arrays])
    host = torch.from_numpy(packed)
    flat = host if device.type == "cpu" else host.pin_memory().to(device, non_blocking=True)
    out, start = [], 0
    for a in arrays:
        size = int(np.size(a))
        out.append(flat[start : start + size].view(np.shape(a)))
        start += size
    return out
