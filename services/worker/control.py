"""WorkerControl on one rank: expert load statistics from the engine's window."""

from __future__ import annotations

import grpc

from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker.engine_loop import EngineLoop


class ControlServicer(ctl_grpc.WorkerControlServicer):
    def __init__(self, loop: EngineLoop):
        self.loop = loop

    def GetExpertLoad(self, request, context: grpc.ServicerContext) -> ctl.GetExpertLoadResponse:
        engine = self.loop.engine
        counts, tokens, steps = self.loop.run(engine.expert_load)
        mc = engine.model_config
        placement = engine.model.parallel.placement
        return ctl.GetExpertLoadResponse(
            num_experts=mc.num_experts,
            top_k=mc.num_experts_per_tok,
            ep_size=placement.ep_size,
            num_slots=placement.num_slots,
            window_tokens=tokens,
            window_steps=steps,
            layers=[
                ctl.LayerExpertLoad(layer=layer, tokens_per_expert=row)
                for layer, row in zip(mc.moe_layers, counts.tolist(), strict=True)
            ],
        )
