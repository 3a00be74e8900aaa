"""Expert-parallel load balancing: the placement planner (`planner`), DeepSeek EPLB's interface."""

from services.eplb.measure import balancedness, gpu_loads
from services.eplb.planner import rebalance_experts

__all__ = ["balancedness", "gpu_loads", "rebalance_experts"]
