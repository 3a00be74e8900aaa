"""Expert-parallel load balancing: the placement planner (`rebalance`: DeepSeek EPLB's interface),
its policies (`greedy`, `locality`, `incremental`), placement files and the `moeserve eplb` command."""

from services.ep.measure import balancedness, gpu_loads
from services.eplb.rebalance import rebalance_experts

__all__ = ["balancedness", "gpu_loads", "rebalance_experts"]
