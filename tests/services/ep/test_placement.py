import pytest
import torch

from services.ep import ExpertLoadRecorder, ExpertPlacement, PlacementError


def test_default_placement_with_redundant_slots():
    p = ExpertPlacement.default(num_layers=2, num_experts=16, num_slots=20, ep_size=2)
    assert p.slots_per_rank == 10 and list(p.local_slots(1)) == list(range(10, 20))
    assert p.replicas[0].tolist() == [2] * 4 + [1] * 12
    assert p.log_to_phys[0, 3].tolist() == [3, 19]
    ids = torch.tensor([[3, 5], [3, 5], [0, 15]])
    slots = p.route(0, ids)
    assert (p.phys_to_log[0][slots] == ids).all()  # every choice lands on a replica of its expert
    assert set(slots[:, 0].tolist()[:2]) == {3, 19}  # replicas share the load


def test_placements_that_cannot_work():
    with pytest.raises(PlacementError, match="below the model's 16"):
        ExpertPlacement.default(1, 16, 12, 2)
    with pytest.raises(PlacementError, match="do not split evenly"):
        ExpertPlacement.default(1, 16, 17, 2)
    with pytest.raises(PlacementError, match="expert 1 has no slot"):
        ExpertPlacement(2, 1, torch.tensor([[0, 0]]))


def test_load_recorder_window():
    rec = ExpertLoadRecorder(num_layers=2, num_experts=4, window_steps=2)
    for _ in range(3):
        rec.record(0, torch.tensor([[0, 1], [1, 2]]))
        rec.record(1, torch.tensor([[3, 3], [3, 0]]))
        rec.end_step(num_tokens=2)
    counts, tokens, steps = rec.snapshot()
    assert steps == 2 and tokens == 4  # the window keeps the last two steps
    assert counts[0].tolist() == [2, 4, 2, 0] and counts[1].tolist() == [2, 0, 0, 6]
    assert (counts.sum(1) == tokens * 2).all()
