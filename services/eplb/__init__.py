"""Expert-parallel load balancing: the placement planner (`planner`), DeepSeek EPLB's interface."""

from services.eplb.planner import balancedness, gpu_loads, rebalance_experts

__all__ = ["balancedness", "gpu_loads", "rebalance_experts"]
