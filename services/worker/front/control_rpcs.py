"""WorkerControl on rank 0: expert load statistics summed over the instance's ranks, and live
rebalancing (a new expert placement, switched by every rank at the same step)."""

from __future__ import annotations

import grpc

from services.engine import Engine
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker.front.dp_controller import DPController
from services.worker.front.rebalancing import RebalanceError, Rebalancer


class ControlServicer(ctl_grpc.WorkerControlServicer):
    """What an operator or planner asks of the instance."""

    def __init__(
        self,
        engine: Engine,
        controller: DPController,
        eplb_interval_s: float = 0.0,
        eplb_tolerance: float = 0.01,
    ):
        self.engine, self.ctl = engine, controller
        self.rebalancer = Rebalancer(engine, controller)
        if eplb_interval_s > 0:
            self.rebalancer.every(eplb_interval_s, eplb_tolerance)

    def GetExpertLoad(
        self, request: ctl.GetExpertLoadRequest, context: grpc.ServicerContext
    ) -> ctl.GetExpertLoadResponse:
        try:
            weight, loads = self.rebalancer.window()
        except RebalanceError as e:
            context.abort(grpc.StatusCode[e.code], str(e))
        counts = weight.long().tolist()
        mc = self.engine.model_config
        parallel = self.engine.model.parallel
        placement = parallel.placement
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
            phy2log=placement.phys_to_log.flatten().tolist(),
            placement_version=parallel.version,
        )

    def Rebalance(
        self, request: ctl.RebalanceRequest, context: grpc.ServicerContext
    ) -> ctl.RebalanceResponse:
        try:
            weight, _ = self.rebalancer.window()
            if request.phy2log:
                new = self.rebalancer.checked(list(request.phy2log))
            else:
                new = self.rebalancer.planned(weight, request.tolerance or 0.01)
            done = self.rebalancer.switch(new, weight)
        except RebalanceError as e:
            context.abort(grpc.StatusCode[e.code], str(e))
        return ctl.RebalanceResponse(
            version=done.version,
            slots_changed=done.slots_changed,
            balancedness_before=done.before,
            balancedness_after=done.after,
        )
