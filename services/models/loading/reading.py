"""Reading a planned set of checkpoint tensors into a model's parameters, in parallel.

One reader thread per CPU takes a shard at a time, in file order. A tensor whose stored dtype
and layout match its parameter is read straight into it (one copy, no buffer); others go through
a buffer (FP8 weights are dequantized in place in the parameter), with the buffers held at once
bounded to a share of the weights. Long loads report their progress.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path

import torch
from torch import nn

from services.models.config import ModelConfig, ModelConfigError
from services.models.loading.checkpoint import Checkpoint
from services.models.loading.weights import Copy, Piece, Route, View, WeightMap
from services.models.quant import QuantConfigError

READERS = min(8, max(2, len(os.sched_getaffinity(0))))
"""Threads reading shards at once, one per CPU this process may use (2 to 8): reads and copies
release the GIL, and more threads than CPUs only contend (measured in bench/load.py)."""
IN_FLIGHT_SHARE = 0.1
"""Host memory for tensors read but not yet copied: this share of the weights being loaded (at
least the largest tensor), so a load peaks at about 1.1x its final weights."""
PROGRESS_AFTER_S = 3.0
"""Loads longer than this report progress, about every PROGRESS_EVERY_S."""
PROGRESS_EVERY_S = 5.0


def read_into_model(
    ckpt: Checkpoint,
    plan: dict[str, tuple[Route, str | None]],
    weights: WeightMap,
    cfg: ModelConfig,
    report: Callable[[str], None],
    start: float,
) -> dict[str, set[Piece]]:
    """Read the planned tensors into the parameters on READERS threads (a shard per thread at a
    time, in file order); returns the pieces of each parameter filled."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in sorted(plan, key=lambda n: ckpt.entries[n].start):
        by_file[ckpt.entries[name].file].append(name)
    total = sum(ckpt.entries[n].nbytes for n in plan) or 1
    cost = {n: _host_bytes(ckpt, n, plan[n][1]) for n in plan}
    budget = _Budget(max(max(cost.values(), default=0), int(IN_FLIGHT_SHARE * sum(cost.values()))))
    filled: dict[str, set[Piece]] = defaultdict(set)
    lock = threading.Lock()
    stop = threading.Event()

    def load(name: str) -> None:
        route, scale_name = plan[name]
        copies = list(route.copies)
        direct = _direct_target(weights, copies[0], ckpt.entries[name].dtype, scale_name)
        if direct is not None:  # straight from the file into the parameter: no buffer, one copy
            ckpt.read_into(name, direct)
            source, scale, copies = direct, None, copies[1:]
        else:
            budget.acquire(cost[name], stop)
            source = ckpt.read(name)
            scale = ckpt.read(scale_name) if scale_name is not None else None
        try:
            for c in copies:
                src = c.src(source) if c.src else source
                _copy(weights.params[c.param], c.dst, src, scale, cfg, name)
        except QuantConfigError as e:
            raise ModelConfigError(f"{ckpt.entries[name].file}: {e}") from None
        finally:
            if direct is None:
                del source, scale
                budget.release(cost[name])
        with lock:
            for c in route.copies:
                filled[c.param].update(c.pieces)

    def read_file(names: list[str]) -> None:
        for name in names:
            if stop.is_set():
                return
            load(name)

    with ThreadPoolExecutor(max_workers=max(1, min(READERS, len(by_file)))) as pool:
        pending = {pool.submit(read_file, names) for names in by_file.values()}
        try:
            while pending:
                done, pending = wait(pending, timeout=PROGRESS_EVERY_S, return_when=FIRST_EXCEPTION)
                for f in done:
                    f.result()  # a reader's error stops the load
                elapsed = time.monotonic() - start
                if pending and elapsed > PROGRESS_AFTER_S:
                    report(f"loading weights: {100 * ckpt.bytes_read / total:.0f}% ({elapsed:.0f}s)")
        finally:
            stop.set()
            budget.wake()
    return filled


def _direct_target(weights: WeightMap, c: Copy, dtype: torch.dtype, scale: str | None) -> torch.Tensor | None:
    """The parameter memory a tensor can be read into as it is stored, if any (CPU, same dtype)."""
    if scale is not None or c.src is not None:
        return None
    dst = weights.params[c.param].data
    dst = c.dst(dst) if c.dst is not None else dst
    if dst.device.type != "cpu" or dst.dtype != dtype or not dst.is_contiguous():
        return None
    return dst


def _host_bytes(ckpt: Checkpoint, name: str, scale: str | None) -> int:
    """Host memory a tensor (and its scale) takes between its read and its copy."""
    return ckpt.entries[name].nbytes + (ckpt.entries[scale].nbytes if scale is not None else 0)


class _Budget:
    """Bytes of read buffers that may be held at once (reads straight into parameters hold none)."""

    def __init__(self, cap: int):
        self.cap, self.used = cap, 0
        self._cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> None:
        with self._cond:
            while self.used and self.used + n > self.cap and not stop.is_set():
                self._cond.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


def _copy(
    param: nn.Parameter,
    view: View | None,
    tensor: torch.Tensor,
    scale: torch.Tensor | None,
    cfg: ModelConfig,
    source: str,
) -> None:
    dst = view(param.data) if view is not None else param.data
    if tuple(dst.shape) != tuple(tensor.shape):
        raise ModelConfigError(
            f"checkpoint tensor {source} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)} "
            "from config.json"
        )
    if scale is not None:
        cfg.quant.dequantize_into(dst, tensor, scale, source)  # type: ignore[union-attr]
    else:
        dst.copy_(tensor)
