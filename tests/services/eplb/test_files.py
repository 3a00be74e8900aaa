"""Placement and loads files: round trips, and clear errors when one does not fit the group."""

from __future__ import annotations

import pytest
import torch

from services.eplb import rebalance_experts
from services.eplb.files import PlacementFileError, read_loads, read_placement, write_loads, write_placement
from services.worker.config import WorkerConfig


def test_round_trips_and_mismatches_are_named(tmp_path):
    weight = torch.rand(3, 16) * 100
    write_loads(
        tmp_path / "loads.json", {"num_experts": 16, "ep_size": 4, "tokens_per_expert": weight.tolist()}
    )
    read, meta = read_loads(tmp_path / "loads.json")
    assert torch.allclose(read, weight) and meta["ep_size"] == 4
    phy2log = rebalance_experts(read, 20, 4, 1, 4)[0]
    write_placement(tmp_path / "p.json", phy2log, 16, 4)
    assert torch.equal(read_placement(tmp_path / "p.json", 3, 16, 4), phy2log)
    with pytest.raises(PlacementFileError, match="planned for 4 GPUs; this group has 2"):
        read_placement(tmp_path / "p.json", 3, 16, 2)
    with pytest.raises(PlacementFileError, match="this model has 32 experts in 3 MoE layers"):
        read_placement(tmp_path / "p.json", 3, 32, 4)
    with pytest.raises(PlacementFileError, match="is not a moeserve-placement/1 file"):
        read_placement(tmp_path / "loads.json", 3, 16, 4)
    with pytest.raises(PlacementFileError, match="cannot read"):
        read_placement(tmp_path / "missing.json", 3, 16, 4)


def test_a_placement_file_needs_an_expert_parallel_group(tmp_path):
    with pytest.raises(ValueError, match="needs --ep 2 or more"):
        WorkerConfig(role="decode", model=tmp_path, ep_placement=str(tmp_path / "p.json"))
