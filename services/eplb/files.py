"""The JSON files operators plan with: expert loads (`moeserve eplb dump`) and placements
(`moeserve eplb plan`, read by `moeserve worker --ep-placement`).

loads:      {"format": "moeserve-expert-load/1", "num_experts", "top_k", "ep_size", "num_slots",
             "window_tokens", "window_steps", "tokens_per_expert": [[per expert] per MoE layer]}
placement:  {"format": "moeserve-placement/1", "num_experts", "num_gpus", "num_nodes",
             "phy2log": [[logical expert of each slot] per MoE layer]}
            (GPU g holds slots g·k .. g·k+k-1, k = slots / num_gpus, as rebalance_experts returns)
SGLang:     {"physical_to_logical_map": [[logical expert of each slot] per decoder layer]}
            what `sglang.launch_server --init-expert-location FILE` loads: one row per decoder
            layer, dense ones included (61 for DeepSeek-V3), the same slot order (rank r holds
            slots r·k .. r·k+k-1), and slots = routed experts + `--ep-num-redundant-experts`
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from services.ep.moe_layers import moe_layer_ids

LOADS, PLACEMENT = "moeserve-expert-load/1", "moeserve-placement/1"


class PlacementFileError(ValueError):
    """A loads or placement file that cannot be used; the message says why."""


def _read(path: Path, kind: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PlacementFileError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict) or data.get("format") != kind:
        raise PlacementFileError(f"{path} is not a {kind} file (its format is {data.get('format')!r})")
    return data


def write_loads(path: Path, loads: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps({"format": LOADS, **loads}))


def read_loads(path: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """(tokens per expert [layers, experts], the rest of the file)."""
    data = _read(path, LOADS)
    weight = torch.tensor(data["tokens_per_expert"], dtype=torch.float)
    if weight.dim() != 2 or weight.shape[1] != data["num_experts"]:
        raise PlacementFileError(f"{path}: tokens_per_expert must be [layers][{data['num_experts']}]")
    return weight, data


def write_placement(
    path: Path, phy2log: torch.Tensor, num_experts: int, num_gpus: int, num_nodes: int = 1
) -> None:
    body = {"format": PLACEMENT, "num_experts": num_experts, "num_gpus": num_gpus, "num_nodes": num_nodes}
    Path(path).write_text(json.dumps({**body, "phy2log": phy2log.tolist()}))


def read_placement(path: Path, num_layers: int, num_experts: int, num_gpus: int) -> torch.Tensor:
    """phy2log [layers, slots] of a placement file, checked against the model and the group."""
    data = _read(path, PLACEMENT)
    phy2log = torch.tensor(data["phy2log"], dtype=torch.long)
    if data["num_experts"] != num_experts or phy2log.dim() != 2 or phy2log.shape[0] != num_layers:
        raise PlacementFileError(
            f"{path} places {data['num_experts']} experts over {phy2log.shape[0]} layers; this model has "
            f"{num_experts} experts in {num_layers} MoE layers"
        )
    if data["num_gpus"] != num_gpus:
        raise PlacementFileError(
            f"{path} was planned for {data['num_gpus']} GPUs; this group has {num_gpus} ranks"
        )
    return phy2log


def write_sglang_placement(
    path: Path, phy2log: torch.Tensor, num_experts: int, model_config: dict[str, Any]
) -> None:
    """The placement in SGLang's `--init-expert-location` format for the model of `model_config`
    (its config.json): MoE layer i's row goes to its decoder layer; a dense layer's row, which
    SGLang never reads, holds the default placement."""
    moe = moe_layer_ids(model_config)
    if len(moe) != phy2log.shape[0]:
        raise PlacementFileError(
            f"the loads cover {phy2log.shape[0]} MoE layers; this model has {len(moe)} "
            f"(of {model_config['num_hidden_layers']} decoder layers)"
        )
    slots = phy2log.shape[1]
    rows = [[s % num_experts for s in range(slots)] for _ in range(int(model_config["num_hidden_layers"]))]
    for row, layer in zip(phy2log.tolist(), moe, strict=True):
        rows[layer] = row
    Path(path).write_text(json.dumps({"physical_to_logical_map": rows}))
