"""What only rank 0 of an instance runs: the gRPC server and its services (SGLang's scheduler, the
KV hand-off, worker control), the DP controller that hands calls to ranks, live rebalancing, the
routers' first-token feeds and the worker's `/metrics`."""
