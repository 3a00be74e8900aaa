"""Which decoder layers of a checkpoint hold routed experts, from its config.json: the rule the model
code builds its layers by and the one expert placements are indexed by (moeserve's files count MoE
layers only; SGLang's count every decoder layer, its dense ones included)."""

from __future__ import annotations

from typing import Any


def moe_layer_ids(raw: dict[str, Any]) -> tuple[int, ...]:
    """The MoE layers' indices among the `num_hidden_layers` decoder layers (MTP layers excluded).

    DeepSeek-V3 / Kimi K2: every `moe_layer_freq`-th layer from `first_k_dense_replace`.
    Qwen3-MoE: every `decoder_sparse_step`-th layer (1-based) not in `mlp_only_layers`."""
    layers = int(raw["num_hidden_layers"])
    if "first_k_dense_replace" in raw or "n_routed_experts" in raw:
        first_dense = int(raw.get("first_k_dense_replace") or 0)
        freq = int(raw.get("moe_layer_freq") or 1)
        return tuple(i for i in range(layers) if i >= first_dense and i % freq == 0)
    step = int(raw.get("decoder_sparse_step") or 1)
    dense = set(raw.get("mlp_only_layers") or [])
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    return tuple(i for i in range(layers) if i not in dense and experts > 0 and (i + 1) % step == 0)
