"""How good a placement is: each expert's slots, each GPU's load, and balancedness."""

from __future__ import annotations

import torch


def replica_counts(phy2log: torch.Tensor, experts: int) -> torch.Tensor:
    """logcnt [layers, experts]: how many slots hold each expert."""
    return torch.zeros(phy2log.shape[0], experts, dtype=torch.long).scatter_add_(
        1, phy2log, torch.ones_like(phy2log)
    )


def maps(phy2log: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log2phy [layers, experts, max replicas] padded with -1, logcnt [layers, experts])."""
    layers, slots = phy2log.shape
    logcnt = replica_counts(phy2log, experts)
    order = phy2log.argsort(dim=1, stable=True)  # slots grouped by expert, in slot order
    starts = logcnt.cumsum(1) - logcnt
    nth = torch.arange(slots).expand(layers, -1) - starts.gather(1, phy2log.gather(1, order))
    log2phy = torch.full((layers, experts, int(logcnt.max())), -1, dtype=torch.long)
    log2phy[torch.arange(layers).unsqueeze(1), phy2log.gather(1, order), nth] = order
    return log2phy, logcnt


def gpu_loads(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> torch.Tensor:
    """[layers, num_gpus]: each GPU's load when an expert's load splits evenly over its slots."""
    layers, experts = weight.shape
    logcnt = replica_counts(phy2log, experts)
    per_slot = weight.float().gather(1, phy2log) / logcnt.gather(1, phy2log)
    return per_slot.view(layers, num_gpus, -1).sum(-1)


def balancedness(weight: torch.Tensor, phy2log: torch.Tensor, num_gpus: int) -> float:
    """Mean ÷ max GPU load, averaged over layers (1.0: perfectly even)."""
    loads = gpu_loads(weight, phy2log, num_gpus)
    return float((loads.mean(1) / loads.max(1).values.clamp_min(1e-12)).mean())
