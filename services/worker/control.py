"""WorkerControl on rank 0: expert load statistics summed over the instance's ranks, and live
rebalancing (a new expert placement, switched by every rank at the same step)."""

from __future__ import annotations

import time

import grpc
import torch

from services.engine import Engine
from services.ep import ExpertPlacement, PlacementError
from services.eplb import balancedness, rebalance_experts
from services.proto.moeserve.v1 import worker_control_pb2 as ctl
from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc
from services.worker import messages as msg
from services.worker.dp_controller import CallFailed, DPController

TIMEOUT_S = 10.0
SWITCH_TIMEOUT_S = 60.0
"""How long Rebalance waits for every rank to switch (one step of the group, plus the weight copy)."""
NOT_A_GROUP = "rebalancing moves experts between EP ranks: start the instance with --ep 2 or more"
UNDER_WAY = "a placement switch is already under way; retry once it is done"


class ControlServicer(ctl_grpc.WorkerControlServicer):
    """What an operator or planner asks of the instance."""

    def __init__(self, engine: Engine, controller: DPController):
        self.engine, self.ctl = engine, controller

    def _counts(self, context: grpc.ServicerContext) -> tuple[list[list[int]], list[msg.ExpertLoad]]:
        try:
            loads = self.ctl.ask_all("expert_load", TIMEOUT_S)
        except CallFailed as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"EP instance rank unreachable: {e.message}")
        per_layer = zip(*(ld.counts for ld in loads), strict=True)  # [layers][experts], summed over ranks
        return [[sum(col) for col in zip(*rows, strict=True)] for rows in per_layer], loads

    def GetExpertLoad(self, request, context: grpc.ServicerContext) -> ctl.GetExpertLoadResponse:
        counts, loads = self._counts(context)
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

    def Rebalance(self, request, context: grpc.ServicerContext) -> ctl.RebalanceResponse:
        par = self.engine.model.parallel
        if par.dispatcher is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, NOT_A_GROUP)
        if par.pending is not None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, UNDER_WAY)
        current = par.placement.phys_to_log
        weight = torch.tensor(self._counts(context)[0], dtype=torch.float)
        new = self._target(request, weight, context)
        before = par.version
        self._switch(new, before, context)
        window = float(weight.sum()) > 0
        return ctl.RebalanceResponse(
            version=par.version,
            slots_changed=int((new != current).sum()),
            balancedness_before=balancedness(weight, current, par.size) if window else 0.0,
            balancedness_after=balancedness(weight, new, par.size) if window else 0.0,
        )

    def _target(self, request, weight: torch.Tensor, context) -> torch.Tensor:
        """The placement asked for, or one planned from the window near the current one; checked."""
        par = self.engine.model.parallel
        current = par.placement.phys_to_log
        if not request.phy2log:
            plan = rebalance_experts(
                weight, current.shape[1], 1, 1, par.size, current=current, tolerance=request.tolerance or 0.01
            )
            return plan[0]
        if len(request.phy2log) != current.numel():
            layers, slots = current.shape
            message = f"phy2log has {len(request.phy2log)} entries; this instance has {layers} x {slots}"
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
        new = torch.tensor(list(request.phy2log), dtype=torch.long).view(current.shape)
        try:
            ExpertPlacement(par.placement.num_experts, par.size, new)
        except (PlacementError, RuntimeError, IndexError) as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the placement cannot be served: {e}")
        return new

    def _switch(self, new: torch.Tensor, before: int, context) -> None:
        """Hand `new` to every rank, then wait until all of them have switched (the same step)."""
        rows = tuple(map(tuple, new.tolist()))
        try:
            calls = [self.ctl.call(r, lambda cid: msg.SetPlacement(cid, rows)) for r in range(self.ctl.size)]
            if not all(call.result(TIMEOUT_S) for call in calls):
                context.abort(grpc.StatusCode.FAILED_PRECONDITION, UNDER_WAY)
            deadline = time.monotonic() + SWITCH_TIMEOUT_S
            while min(self.ctl.ask_all("placement", TIMEOUT_S)) <= before:
                if time.monotonic() > deadline:
                    context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED, f"ranks did not switch in {SWITCH_TIMEOUT_S:.0f}s"
                    )
                time.sleep(0.02)
        except CallFailed as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"EP instance rank unreachable: {e.message}")
