"""docker-compose.yml and the images' Dockerfiles, checked with real linters from npm (installed by
`make setup` into .venv/node: dclint for the compose file, dockerfile-utils for Dockerfiles) and
for what the project asks of them (multi-stage, pinned bases, non-root, healthchecks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
TOOLS = Path(sys.prefix) / "node" / "node_modules" / ".bin"
DOCKERFILES = [ROOT / "deploy" / "Dockerfile.cpu", ROOT / "deploy" / "Dockerfile.cuda"]


def tool(name: str) -> str:
    path = TOOLS / name
    assert path.is_file(), f"{name} is missing: run `make setup` on a machine with npm"
    return str(path)


def test_compose_file_passes_dclint_and_starts_in_order():
    r = subprocess.run([tool("dclint"), str(ROOT / "docker-compose.yml")], capture_output=True, text=True)
    assert r.returncode == 0 and "problem" not in r.stdout, r.stdout + r.stderr
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert set(services) == {"model", "prefill", "decode", "orchestrator"}
    for worker in ("prefill", "decode"):
        assert services[worker]["depends_on"]["model"]["condition"] == "service_completed_successfully"
        assert services["orchestrator"]["depends_on"][worker]["condition"] == "service_healthy"
        assert services[worker]["healthcheck"]["test"][-1].endswith("healthcheck.py")
    assert all(p.startswith("127.0.0.1:") for p in services["orchestrator"]["ports"])  # loopback only


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean_and_follow_the_rules(dockerfile):
    r = subprocess.run([tool("dockerfile-utils"), "lint", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0 and not r.stdout.strip(), r.stdout + r.stderr
    text = dockerfile.read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2, "multi-stage"
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: re.search(rf"ARG {m[1]}=(\S+)", text)[1], b) for b in stages]
    assert all(":" in b and not b.endswith(":latest") for b in bases), bases  # pinned tags
    assert re.search(r"^USER 10001$", text, re.M), "runs as a non-root user"
    assert re.search(r"^HEALTHCHECK .*healthcheck\.py", text, re.M)


def test_the_cuda_image_builds_deepep_by_default_and_keeps_nvcc_for_its_kernels():
    """DeepEP 2 JIT-compiles its kernels at first use: the image that runs it needs nvcc (a CUDA
    devel base), and it is the chart's default dispatcher, so it is built in unless asked not to,
    from a pinned commit (its tags do not name the version moeserve follows)."""
    text = (ROOT / "deploy" / "Dockerfile.cuda").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    final = re.findall(r"^FROM\s+(\S+)", text, re.M)[-1]
    final = re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], final)
    assert "-devel-" in final, final
    assert args["WITH_DEEPEP"] == "1"
    assert re.fullmatch(r"[0-9a-f]{7,40}", args["DEEPEP_COMMIT"]), args["DEEPEP_COMMIT"]
    assert 'checkout "$DEEPEP_COMMIT"' in text and "--branch" not in text
