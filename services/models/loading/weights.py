"""Which parameter each checkpoint tensor fills, decided from the tensor's name alone.

Parameter names follow the Hugging Face checkpoints, except that routed experts are stacked per
layer (`experts.w13` = gate and up, `experts.w2` = down) over this rank's expert slots. A
checkpoint stores experts one by one (`experts.E.gate_proj.weight`, as the official releases do)
or fused (`experts.gate_up_proj`, as `transformers` keeps them in memory); both map onto the
stacked slots, each expert into every local slot that replicates it. Because the route is known
from the name, a rank never reads another rank's experts. Tensors of multi-token-prediction
layers (past `num_hidden_layers`) are skipped; a name that matches nothing is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from services.models.config import ModelConfig

_EXPERT = re.compile(
    r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight(_scale_inv)?$"
)
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")

View = Callable[[torch.Tensor], torch.Tensor]
Piece = tuple[int, int] | None
"""A part of a parameter that loading fills: (slot, half) of stacked experts (w13: 0 gate, 1 up;
w2: 0), None for a whole parameter."""


@dataclass(frozen=True)
class Copy:
    """Fill `dst(parameter)` with `src(tensor)`; `pieces` names the parts of the parameter it fills."""

    param: str
    dst: View | None = None
    src: View | None = None
    pieces: tuple[Piece, ...] = (None,)


@dataclass(frozen=True)
class Route:
    """What loading does with one checkpoint tensor: copy it, or skip it without reading (and why)."""

    copies: tuple[Copy, ...] = ()
    skip: str = ""
    """"mtp" (a multi-token-prediction layer), "other rank" (experts this rank does not hold),
    "derived" (recomputed at load, e.g. rotary frequencies); empty when the tensor is read."""


class WeightMap:
    """Routes for one model's parameters (this rank's expert slots included)."""

    def __init__(self, model: nn.Module, cfg: ModelConfig, local_experts: torch.Tensor):
        """`local_experts` [moe layers, local slots]: the expert each of this rank's slots holds."""
        self.cfg = cfg
        self.params = dict(model.named_parameters())
        self._slots_of: list[dict[int, list[int]]] = []
        for row in local_experts.tolist():
            slots: dict[int, list[int]] = {}
            for slot, expert in enumerate(row):
                slots.setdefault(expert, []).append(slot)
            self._slots_of.append(slots)

    def route(self, name: str) -> Route | None:
        """Where checkpoint tensor `name` goes; None when no parameter takes it."""
        layer = _LAYER.match(name)
        if layer and int(layer.group(1)) >= self.cfg.num_layers:
            # Multi-token-prediction layers sit right past the stack, as many as config.json says;
            # any other layer past it is a checkpoint that does not match its config (None: an error).
            past = int(layer.group(1)) - self.cfg.num_layers
            return Route(skip="mtp") if past < self.cfg.num_mtp_layers else None
        if name.endswith("rotary_emb.inv_freq"):
            return Route(skip="derived")
        if m := _EXPERT.match(name):
            if m.group(4) and f"{m.group(1)}.w2_scale_inv" not in self.params:
                return None  # a block scale of experts held dequantized: read with its weight
            return self._expert(m.group(1), int(m.group(2)), m.group(3), m.group(4) or "")
        if m := _FUSED.match(name):
            return self._fused(m.group(1), m.group(2))
        if name in self.params:
            return Route((Copy(name),))
        return None

    def expected_pieces(self, param: str) -> set[Piece]:
        """The pieces that must be filled for `param` to count as loaded."""
        if param.endswith((".experts.w13", ".experts.w13_scale_inv")):
            return {(s, half) for s in range(self.params[param].shape[0]) for half in (0, 1)}
        if param.endswith((".experts.w2", ".experts.w2_scale_inv")):
            return {(s, 0) for s in range(self.params[param].shape[0])}
        return {None}

    def keeps_fp8(self, route: Route) -> bool:
        """The tensor lands in FP8 parameters (kept quantized; its block scale loads on its own)."""
        return any(self.params[c.param].dtype == torch.float8_e4m3fn for c in route.copies)

    def _slots(self, prefix: str, expert: int) -> list[int]:
        """This rank's slots that replicate `expert` in the MoE layer named by `prefix`."""
        return self._slots_of[self.cfg.moe_layers.index(int(prefix.split(".")[2]))].get(expert, [])

    def _expert(self, prefix: str, expert: int, proj: str, suffix: str) -> Route:
        """`suffix` "_scale_inv": the block scales of an expert kept in FP8 (rows in 128-blocks)."""
        slots = self._slots(prefix, expert)
        if not slots:
            return Route(skip="other rank")
        inter = self.cfg.moe_intermediate_size // (128 if suffix else 1)
        if proj == "down_proj":
            target, rows, half = f"{prefix}.w2{suffix}", slice(None), 0
        else:
            half = 0 if proj == "gate_proj" else 1
            target, rows = f"{prefix}.w13{suffix}", slice(half * inter, (half + 1) * inter)
        # cast: mypy infers no type for a lambda with a default argument (the loop variable's binding)
        return Route(
            tuple(Copy(target, dst=cast(View, lambda p, s=s: p[s, rows]), pieces=((s, half),)) for s in slots)
        )

    def _fused(self, prefix: str, kind: str) -> Route:
        target = f"{prefix}.w13" if kind == "gate_up_proj" else f"{prefix}.w2"
        halves = (0, 1) if kind == "gate_up_proj" else (0,)
        copies = tuple(
            Copy(
                target,
                dst=cast(View, lambda p, s=s: p[s]),  # cast: as in `_expert`
                src=cast(View, lambda t, e=e: t[e]),
                pieces=tuple((s, h) for h in halves),
            )
            for e in range(self.cfg.num_experts)
            for s in self._slots(prefix, e)
        )
        return Route(copies)
