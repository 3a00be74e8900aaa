"""SGLang's own code on the CPU, for the conformance tests of the `engine: sglang` path.

The pinned SGLang release and its gRPC servicer (`requirements.txt`, installed by `make setup`
without their CUDA dependencies) run unmodified; what stands in for the GPU is small and named:

- `stubs.py`: `triton` and `torchvision`, the two GPU-bound packages SGLang imports unconditionally;
- `scheduler.py` (+ `kv_events.py`, `tokens.py`): the scheduler processes behind the servicer,
  speaking SGLang's internal ZMQ protocol and its PD bootstrap;
- `worker.py`: `sglang.launch_server` with those schedulers (a worker for end-to-end tests);
- `check.py`: SGLang's argument parser and expert-placement loader, for the chart's command lines.
"""
