"""Expert parallelism: expert placement over EP ranks, token dispatch backends, expert load statistics."""

from services.ep.dispatcher import Dispatched, Dispatcher, Expanded, create
from services.ep.load import ExpertLoadRecorder
from services.ep.parallel import ExpertParallel
from services.ep.placement import ExpertPlacement, PlacementError

__all__ = [
    "Dispatched",
    "Dispatcher",
    "Expanded",
    "ExpertLoadRecorder",
    "ExpertParallel",
    "ExpertPlacement",
    "PlacementError",
    "create",
]
