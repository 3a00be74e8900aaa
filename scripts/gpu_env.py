"""The GPU check's first step: what this machine is (python, torch, CUDA device, nvcc, the packages
moeserve needs); fails when there is no CUDA device. Part of scripts/gpu_check.sh."""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
import sys

import torch

NEEDED = (
    "transformers",
    "safetensors",
    "tokenizers",
    "grpcio",
    "smg-grpc-proto",
    "pyzmq",
    "fastapi",
    "uvicorn",
)


def main() -> int:
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})")
    nvcc = shutil.which("nvcc")
    if nvcc:
        print(
            subprocess.run([nvcc, "--version"], capture_output=True, text=True)
            .stdout.strip()
            .splitlines()[-1]
        )
    for name in NEEDED:
        try:
            print(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            print(f"{name} missing (carry its wheel: scripts/gpu_wheels.txt)")
    if not torch.cuda.is_available():
        print("no CUDA device")
        return 1
    p = torch.cuda.get_device_properties(0)
    print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, compute {p.major}.{p.minor}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
