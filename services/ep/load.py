"""Expert load statistics: tokens per logical expert per MoE layer, over a window of recent steps.

Counts stay tensors on the model's device and are only added to on the hot path (a scatter-add:
`bincount` would have to read its output size back to the host); the window is read (and
synchronised) only when somebody asks.
"""

from __future__ import annotations

from collections import deque

import torch


class ExpertLoadRecorder:
    """Counts tokens per logical expert per MoE layer, step by step, over a sliding window."""

    def __init__(
        self, num_layers: int, num_experts: int, window_steps: int = 1000, device: str | torch.device = "cpu"
    ):
        self.num_layers, self.num_experts = num_layers, num_experts
        self.current = torch.zeros(num_layers, num_experts, dtype=torch.long, device=device)
        self.window: deque[tuple[torch.Tensor, int]] = deque(maxlen=window_steps)
        self._tokens = 0

    def to(self, device: torch.device | str) -> None:
        """Keep the counts on `device` from now on (the model's: `record` takes its router's ids)."""
        self.current = self.current.to(device)
        self.window = deque(((counts.to(device), n) for counts, n in self.window), maxlen=self.window.maxlen)

    def record(self, layer: int, ids: torch.Tensor) -> None:
        """ids: [T, K] logical experts chosen by this rank's tokens in MoE layer `layer` (on the
        counts' device)."""
        if ids.numel():
            flat = ids.reshape(-1)
            self.current[layer].index_add_(0, flat, torch.ones_like(flat))

    def end_step(self, num_tokens: int) -> None:
        """Close a step that computed `num_tokens` tokens on this rank."""
        if num_tokens:
            self.window.append((self.current, num_tokens))
            self.current = torch.zeros_like(self.current)

    def snapshot(self) -> tuple[torch.Tensor, int, int]:
        """(counts [layers, experts] over the window, tokens in the window, steps in the window)."""
        counts = torch.zeros(self.num_layers, self.num_experts, dtype=torch.long)
        tokens = 0
        for step_counts, n in list(self.window):
            counts += step_counts.cpu()
            tokens += n
        return counts, tokens, len(self.window)
