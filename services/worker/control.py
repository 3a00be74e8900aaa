"""WorkerControl on rank 0: expert load statistics summed over the instance's ranks."""

from __future__ import annotations

import grpc

from services.engine import Engine
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker.dp_controller import CallFailed, DPController

TIMEOUT_S = 10.0


class ControlServicer(ctl_grpc.WorkerControlServicer):
    """What an operator or planner asks of the instance."""

    def __init__(self, engine: Engine, controller: DPController):
        self.engine, self.ctl = engine, controller

    def GetExpertLoad(self, request, context: grpc.ServicerContext) -> ctl.GetExpertLoadResponse:
        try:
            loads = self.ctl.ask_all("expert_load", TIMEOUT_S)
        except CallFailed as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"EP instance rank unreachable: {e.message}")
        mc = self.engine.model_config
        placement = self.engine.model.parallel.placement
        # [layers][experts], summed over the ranks
        per_layer = zip(*(ld.counts for ld in loads), strict=True)
        counts = [[sum(col) for col in zip(*rows, strict=True)] for rows in per_layer]
        return ctl.GetExpertLoadResponse(
            num_experts=mc.num_experts,
            top_k=mc.num_experts_per_tok,
            ep_size=placement.ep_size,
            num_slots=placement.num_slots,
            window_tokens=sum(ld.tokens for ld in loads),
            window_steps=max(ld.steps for ld in loads),
            layers=[
                ctl.LayerExpertLoad(layer=layer, tokens_per_expert=row)
                for layer, row in zip(mc.moe_layers, counts, strict=True)
            ],
        )
