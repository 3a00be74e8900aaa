"""A tiny `moeserve up` on one GPU (one prefill and one decode instance of EP1, on cuda) serving one
chat request. Exits 77 (skipped, with the reason) where the machine cannot run it: the KV hand-off
reads GPU memory only through Mooncake's CUDA wheel. Part of scripts/gpu_check.sh."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import signal
import subprocess
import sys
import time
import urllib.request

from services.common.process import free_port

SKIPPED = 77


def missing() -> str | None:
    for module in ("fastapi", "uvicorn", "zmq", "smg_grpc_proto", "mooncake"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed here (scripts/gpu_wheels.txt)"
    try:
        importlib.metadata.version("mooncake-transfer-engine")
    except importlib.metadata.PackageNotFoundError:
        return "only Mooncake's non-CUDA wheel is here; GPU-resident KV needs mooncake-transfer-engine (CUDA)"
    return None


def main() -> int:
    why = missing()
    if why:
        print(f"skipped: {why}")
        return SKIPPED
    port = free_port()
    cmd = [sys.executable, "-m", "orchestrator.cli", "up", "--port", str(port), "--prefill-ep", "1"]
    cmd += ["--decode-ep", "1", "--worker-arg=--device=cuda"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        deadline, line = time.monotonic() + 120, ""
        while time.monotonic() < deadline and "moeserve is up" not in line:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line and proc.poll() is not None:
                print("moeserve up exited early")
                return 1
        body = {"model": "tiny-deepseek_v3", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            answer = json.loads(r.read())
        print(f"chat on cuda: {answer['choices'][0]['finish_reason']}, {answer['usage']}")
        return 0
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
