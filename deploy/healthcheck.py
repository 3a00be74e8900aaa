"""Container health for the moeserve image: the orchestrator's /health, or a worker's HealthCheck.

`MOESERVE_ROLE` (orchestrator | prefill | decode) and `MOESERVE_PORT` say what to ask; exit 0
when healthy, 1 otherwise. Used by the images' HEALTHCHECK and docker-compose.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def main() -> int:
    role, port = os.environ.get("MOESERVE_ROLE", "orchestrator"), os.environ.get("MOESERVE_PORT", "8000")
    try:
        if role == "orchestrator":
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=3) as r:
                return 0 if r.status == 200 else 1
        import grpc
        from smg_grpc_proto import sglang_scheduler_pb2 as pb
        from smg_grpc_proto import sglang_scheduler_pb2_grpc as pb_grpc

        from services.common import wire  # installed in the image with moeserve

        stub = pb_grpc.SglangSchedulerStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        # The workers' shared gRPC token, if set. (The worker waits up to 8 s for its ranks; the
        # probes give this 10 s.)
        metadata = wire.auth_metadata()
        return 0 if stub.HealthCheck(pb.HealthCheckRequest(), timeout=9, metadata=metadata).healthy else 1
    except Exception as e:  # any failure is unhealthy; say why in the health log
        print(f"unhealthy: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
