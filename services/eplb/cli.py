"""`moeserve eplb ...`: plan expert placements offline from recorded loads.

    moeserve eplb dump --instance HOST:PORT -o LOADS.json
    moeserve eplb plan --loads LOADS.json --slots S [--gpus G] [--nodes N] [--groups K]
                       [--policy auto|hierarchical|global|locality] [--from CURRENT.json]
                       [--tolerance 0.01] [--format moeserve|sglang --model DIR] -o PLACEMENT.json
    moeserve eplb rebalance --instance HOST:PORT [--placement PLACEMENT.json]

`dump` writes an instance's expert loads over its recent window (WorkerControl.GetExpertLoad);
`plan` writes a placement (`moeserve worker --ep-placement FILE` starts from it; with `--format
sglang --model DIR`, SGLang's `--init-expert-location FILE` instead) and prints its
balancedness on the loads beside the default placement's and, with `--from`, how many slots change;
`rebalance` switches a running instance to a placement (a file, or planned from its own window)
while it serves (WorkerControl.Rebalance).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from services.common import wire
from services.common.typer_main import run_app

app = typer.Typer(name="eplb", add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


@app.command(help="write an instance's expert loads (its recent window) to a JSON file")
def dump(
    instance: Annotated[str, typer.Option(help="HOST:PORT of the instance's gRPC server")],
    output: Annotated[Path, typer.Option("-o", "--output", help="loads file to write")],
) -> None:
    import grpc

    from services.eplb.files import write_loads
    from services.proto.moeserve.v1 import worker_control_pb2 as ctl
    from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc

    try:
        with grpc.insecure_channel(instance) as channel:
            # grpc_tools generates the stub class without annotations
            stub = ctl_grpc.WorkerControlStub(channel)  # type: ignore[no-untyped-call]  # generated, unannotated
            res = stub.GetExpertLoad(ctl.GetExpertLoadRequest(), timeout=30, metadata=wire.auth_metadata())
    except grpc.RpcError as e:
        print(f"error: {instance} answered {e.code().name}: {e.details()}", file=sys.stderr)
        raise typer.Exit(1) from None
    write_loads(output, {
        "num_experts": res.num_experts, "top_k": res.top_k, "ep_size": res.ep_size,
        "num_slots": res.num_slots, "window_tokens": res.window_tokens, "window_steps": res.window_steps,
        "tokens_per_expert": [list(layer.tokens_per_expert) for layer in res.layers],
    })  # fmt: skip
    print(
        f"wrote {len(res.layers)} layers x {res.num_experts} experts ({res.window_tokens} tokens) to {output}"
    )


@app.command(help="plan a placement from a loads file")
def plan(
    loads: Annotated[Path, typer.Option(help="a file from `moeserve eplb dump`")],
    slots: Annotated[int, typer.Option(help="physical expert slots over the group")],
    output: Annotated[Path, typer.Option("-o", "--output", help="placement file to write")],
    gpus: Annotated[int, typer.Option(help="EP ranks (default: the instance's in the loads file)")] = 0,
    nodes: Annotated[int, typer.Option(help="nodes the group spans")] = 1,
    groups: Annotated[
        int, typer.Option(help="expert groups (hierarchical policy when they split over nodes)")
    ] = 1,
    current: Annotated[
        Path | None, typer.Option("--from", help="the placement in use: move as few slots as possible")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="balancedness a --from plan may give up")] = 0.01,
    policy: Annotated[
        str,
        typer.Option(
            help="auto (DeepSeek's choice: hierarchical when groups split over nodes, else global), "
            "hierarchical, global, or locality (balanced nodes, replicas on nodes tokens visit)"
        ),
    ] = "auto",
    format: Annotated[
        str,
        typer.Option(
            help="moeserve (for `moeserve worker --ep-placement`) or sglang (for SGLang's "
            "`--init-expert-location`: one row per decoder layer, needs --model)"
        ),
    ] = "moeserve",
    model: Annotated[
        Path | None, typer.Option(help="--format sglang: the model directory (its config.json)")
    ] = None,
) -> None:
    from services.ep.placement import ExpertPlacement
    from services.eplb import balancedness, rebalance_experts
    from services.eplb.files import (
        PlacementFileError,
        read_loads,
        read_placement,
        write_placement,
        write_sglang_placement,
    )

    if format not in ("moeserve", "sglang"):
        print(f"error: --format {format!r}: choose moeserve or sglang", file=sys.stderr)
        raise typer.Exit(2)
    config = None
    if format == "sglang":
        try:
            config = json.loads((Path(model or "") / "config.json").read_text()) if model else None
        except (OSError, ValueError) as e:
            print(f"error: --model {model}: cannot read its config.json: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        if config is None:
            print("error: --format sglang needs --model DIR (SGLang's file has a row per decoder layer)",
                  file=sys.stderr)  # fmt: skip
            raise typer.Exit(2)
    try:
        weight, meta = read_loads(loads)
        layers, experts = weight.shape
        gpus = gpus or int(meta["ep_size"])
        now = read_placement(current, layers, experts, gpus) if current is not None else None
        shape = (slots, groups, nodes, gpus)
        phy2log = rebalance_experts(weight, *shape, policy, now, tolerance, counts=True)[0]
        if config is not None:
            write_sglang_placement(output, phy2log, experts, config)
        else:
            write_placement(output, phy2log, experts, gpus, nodes)
    except (PlacementFileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    default = ExpertPlacement.default(layers, experts, slots, gpus).phys_to_log
    kind = "" if config is None else f" (SGLang's format, {config['num_hidden_layers']} decoder layers)"
    print(f"wrote {output}{kind}: {layers} MoE layers, {slots} slots on {gpus} GPUs ({nodes} node(s))")
    print(f"balancedness on these loads: {balancedness(weight, phy2log, gpus):.4f} "
          f"(default placement: {balancedness(weight, default, gpus):.4f})")  # fmt: skip
    if now is not None:
        print(f"slots changed from {current}: {int((phy2log != now).sum())} of {phy2log.numel()}")


@app.command(help="switch a running EP instance to a new placement (between two steps, no stop)")
def rebalance(
    instance: Annotated[str, typer.Option(help="HOST:PORT of the instance's gRPC server")],
    placement: Annotated[
        Path | None, typer.Option(help="placement file to switch to (default: planned from its load window)")
    ] = None,
    tolerance: Annotated[float, typer.Option(help="when planning: balancedness it may give up")] = 0.01,
) -> None:
    import grpc

    from services.eplb.files import PlacementFileError, read_placement
    from services.proto.moeserve.v1 import worker_control_pb2 as ctl
    from services.proto.moeserve.v1 import worker_control_pb2_grpc as ctl_grpc

    try:
        with grpc.insecure_channel(instance) as channel:
            stub = ctl_grpc.WorkerControlStub(channel)  # type: ignore[no-untyped-call]  # generated, unannotated
            request = ctl.RebalanceRequest(tolerance=tolerance)
            if placement is not None:
                now = stub.GetExpertLoad(
                    ctl.GetExpertLoadRequest(), timeout=30, metadata=wire.auth_metadata()
                )
                layers = len(now.layers)
                rows = read_placement(placement, layers, now.num_experts, now.ep_size)
                request.phy2log.extend(rows.flatten().tolist())
            res = stub.Rebalance(request, timeout=120, metadata=wire.auth_metadata())
    except PlacementFileError as e:
        print(f"error: {e}", file=sys.stderr)
        raise typer.Exit(2) from None
    except grpc.RpcError as e:
        print(f"error: {instance} answered {e.code().name}: {e.details()}", file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"switched to placement {res.version}: {res.slots_changed} slots changed; balancedness of the "
          f"load window {res.balancedness_before:.4f} -> {res.balancedness_after:.4f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_app(app, argv, "moeserve eplb")
