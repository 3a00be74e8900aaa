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


# --- Layer order, pins, build context and the release workflow (issue 26) ---------------------------

SOURCE = {"orchestrator", "services"}  # the project's packages (pyproject: packages.find)


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in dockerfile.read_text().splitlines():
        if line.lstrip().startswith("#"):  # also inside a continued instruction
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        if pending.strip():
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    """The instructions of each stage (FROM first); what stands before the first FROM is left out."""
    result: list[list[tuple[str, str]]] = []
    for keyword, rest in instructions(dockerfile):
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, rest))
    return result


def copy_sources(rest: str) -> list[str]:
    """Paths a COPY takes from the build context (none for COPY --from)."""
    words = rest.split()
    if any(w.startswith("--from") for w in words):
        return []
    words = [w for w in words if not w.startswith("--")]
    return [w.rstrip("/").removeprefix("./") for w in words[:-1]]


def pip_installs(rest: str) -> list[str]:
    """Each `pip install ...` command in a RUN's shell line (split at && and ;)."""
    return [c.strip() for c in re.split(r"&&|;|\|\|", rest) if re.search(r"\bpip install\b", c)]


def pyproject() -> dict:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_name(req: str) -> str:
    return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower()


def requirements_of_layer(rest: str) -> list[str]:
    """What a RUN installs from pyproject.toml: the requirement list it writes from it (its
    `python -c '...'`, run here against the real pyproject.toml), or what `pip install .[a,b]`
    (without --no-deps) resolves; nothing for other RUNs."""
    code = re.search(r"python3? -c '([^']*)'", rest)
    if code:
        r = subprocess.run(
            [sys.executable, "-c", code[1]], cwd=ROOT, capture_output=True, text=True, check=True
        )
        return r.stdout.split()
    project = pyproject()["project"]
    reqs: list[str] = []
    for cmd in pip_installs(rest):
        spec = re.search(r"""\s["']?\.(?:\[([\w,-]+)\])?["']?(?:\s|$)""", cmd + " ")
        if spec and "--no-deps" not in cmd:
            reqs += project["dependencies"]
            for extra in spec[1].split(",") if spec[1] else []:
                reqs += project["optional-dependencies"][extra]
    return reqs


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dependencies_get_a_layer_of_their_own_before_the_source_is_copied(dockerfile):
    """A code change must not reinstall torch: the build stage copies pyproject.toml, installs the
    dependencies, and only then copies orchestrator/ and services/ and installs the project with
    --no-deps (no pip install after the source COPY resolves anything)."""
    build = stages(dockerfile)[0]
    source_at = next(
        i for i, (k, rest) in enumerate(build) if k == "COPY" and SOURCE & set(copy_sources(rest))
    )
    deps_at = next(
        i
        for i, (k, rest) in enumerate(build)
        if k == "RUN"
        and pip_installs(rest)
        and any(r.startswith("torch==") for r in requirements_of_layer(rest))
    )
    assert deps_at < source_at, (
        f"dependencies installed at instruction {deps_at}, source copied at {source_at}"
    )
    copied_before = {s for k, rest in build[:deps_at] if k == "COPY" for s in copy_sources(rest)}
    assert "pyproject.toml" in copied_before and not copied_before & SOURCE, copied_before
    after = [c for k, rest in build[source_at:] if k == "RUN" for c in pip_installs(rest)]
    assert after, "the project itself is installed after its source is copied"
    assert all("--no-deps" in c for c in after), after
    # Everything pyproject asks for is in the dependency layer (the project install resolves nothing).
    reqs = requirements_of_layer(build[deps_at][1])
    project = pyproject()
    names = {requirement_name(r) for r in reqs}
    wanted = project["build-system"]["requires"] + project["project"]["dependencies"]
    for req in wanted:
        name = requirement_name(req)
        cuda_twin = name.removesuffix("-non-cuda")  # Dockerfile.cuda takes Mooncake's CUDA wheel
        assert name in names or cuda_twin in names, f"{req} is not in the dependency layer"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_install_the_kubernetes_client_for_the_charts_membership_backend(dockerfile):
    """The chart runs the orchestrator with --membership=kubernetes: both images need the extra of
    pyproject.toml that carries the `kubernetes` client."""
    extras = pyproject()["project"]["optional-dependencies"]
    (extra,) = [e for e, reqs in extras.items() if any(requirement_name(r) == "kubernetes" for r in reqs)]
    build = stages(dockerfile)[0]
    installed = [
        r for k, rest in build if k == "RUN" and pip_installs(rest) for r in requirements_of_layer(rest)
    ]
    for req in extras[extra]:
        assert req in installed, f"{dockerfile.name} does not install the `{extra}` extra ({req})"


def dockerignore_patterns() -> list[str]:
    path = ROOT / ".dockerignore"
    assert path.is_file(), "no .dockerignore: the build context would carry .git and .venv"
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    return [ln for ln in lines if ln and not ln.startswith("#")]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, near enough: the last pattern that matches the path or a folder above it wins;
    `!` re-includes; `**` matches any number of folders."""
    from fnmatch import fnmatchcase

    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.removeprefix("!").strip("/").removeprefix("./")
        variants = {pat, pat.replace("**/", "")} if pat.startswith("**/") else {pat}
        if any(fnmatchcase(p, v) for p in prefixes for v in variants):
            ignored = not negate
    return ignored


def test_the_build_context_leaves_out_git_venv_and_caches_but_keeps_what_the_images_copy():
    patterns = dockerignore_patterns()
    for path in (".git", ".venv", ".venv/lib/python3.11/site-packages/torch", ".mypy_cache", ".ruff_cache",
                 ".pytest_cache", ".import_linter_cache", "services/__pycache__", "moeserve.egg-info",
                 "node_modules"):  # fmt: skip
        assert dockerignored(path, patterns), f"{path} is sent with the build context"
    copied = {
        s
        for d in DOCKERFILES
        for st in stages(d)
        for k, rest in st
        if k == "COPY"
        for s in copy_sources(rest)
    }
    assert {"pyproject.toml", "README.md", "orchestrator", "services", "deploy/healthcheck.py"} <= copied
    for path in [*sorted(copied), "services/ep/deepep.py", "orchestrator/cli.py"]:
        assert (ROOT / path).exists(), path
        assert not dockerignored(path, patterns), (
            f"{path} is needed by an image but .dockerignore leaves it out"
        )


def version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def test_the_cuda_image_pins_deepeps_commit_nccl_and_nvshmem_and_keeps_its_jit_cache_on_a_volume():
    """DeepEP 2.1 at dd758caf... asks (README, docs/nvshmem.md) for NCCL >= 2.30.4 and NVSHMEM >=
    3.3.9, found in their pip wheels; both are pinned to exact versions, DeepEP by its full commit
    with its submodule (fmt). Its JIT cache (EP_JIT_CACHE_DIR, csrc/jit/compiler.hpp) points at a
    folder of the final stage that the pod's user may write and the chart can mount."""
    dockerfile = ROOT / "deploy" / "Dockerfile.cuda"
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.M))
    assert re.fullmatch(r"[0-9a-f]{40}", args["DEEPEP_COMMIT"]), "DeepEP by its full commit"
    assert args["DEEPEP_COMMIT"].startswith("dd758ca")
    assert "submodule update --init" in text

    def resolve(s: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), s)

    pins = {}
    for k, rest in stages(dockerfile)[0]:
        for cmd in pip_installs(rest) if k == "RUN" else []:
            for name, version in re.findall(r"(nvidia-(?:nccl|nvshmem)-cu\d+)==([^\"'\s]+)", resolve(cmd)):
                pins[name] = version
    assert set(pins) == {"nvidia-nccl-cu12", "nvidia-nvshmem-cu12"}, pins
    assert all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in pins.values()), pins
    assert version_tuple(pins["nvidia-nccl-cu12"]) >= (2, 30, 4)
    assert version_tuple(pins["nvidia-nvshmem-cu12"]) >= (3, 3, 9)
    # The CUDA base image sets NCCL_VERSION (and others) with ENV, which would override such an ARG.
    assert not {"NCCL_VERSION", "CUDA_VERSION", "NV_CUDA_LIB_VERSION"} & set(args)

    final = stages(dockerfile)[-1]
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(rest for k, rest in final if k == "ENV")))
    cache = env.get("EP_JIT_CACHE_DIR")
    assert cache and cache.startswith("/") and not cache.startswith(("/tmp", "/home")), cache
    runs = " ".join(rest for k, rest in final if k == "RUN")
    assert re.search(rf"mkdir [^&]*{re.escape(cache)}", runs), "the cache folder exists in the image"
    assert re.search(rf"chown 10001 [^&]*{re.escape(cache)}", runs), "and uid 10001 may write it"


WORKFLOW = ROOT / ".github" / "workflows" / "release.yaml"


def workflow() -> dict:
    assert WORKFLOW.is_file(), "no release workflow"
    return yaml.safe_load(WORKFLOW.read_text())


def steps(wf: dict):
    """(job, matrix rows, step) for every step; a job without a matrix has one empty row."""
    for name, job in wf["jobs"].items():
        rows = job.get("strategy", {}).get("matrix", {}).get("include") or [{}]
        for step in job.get("steps", []):
            yield name, rows, step


def test_the_release_workflow_publishes_both_images_and_the_chart_on_a_tag():
    wf = workflow()
    on = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert any(t.startswith("v") for t in on["push"]["tags"]), on
    assert "workflow_dispatch" in on
    assert wf["permissions"] == {"contents": "read", "packages": "write"}
    uses = [s["uses"] for _, _, s in steps(wf) if "uses" in s]
    assert uses and all(re.search(r"@(v\d+|[0-9a-f]{40})$", u) for u in uses), uses

    built = {}
    for _, rows, step in steps(wf):
        if step.get("uses", "").startswith("docker/build-push-action@"):
            w = step["with"]
            assert w["context"] == "." and str(w["push"]).lower() == "true", w
            for row in rows:
                file = re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m, r=row: str(r[m[1]]), w["file"])
                built[file] = row
    assert set(built) == {"deploy/Dockerfile.cpu", "deploy/Dockerfile.cuda"}, built
    # Named as the chart names its image: `image.repository` (.../moeserve) with the appVersion as
    # tag for the default image, which is the CUDA one; the CPU image is the same name, `-cpu` tag.
    values = yaml.safe_load((ROOT / "helm" / "moeserve" / "values.yaml").read_text())
    assert values["image"]["repository"].startswith("ghcr.io/") and values["image"]["repository"].endswith(
        "/moeserve"
    )
    assert (
        built["deploy/Dockerfile.cuda"]["suffix"] == "" and built["deploy/Dockerfile.cpu"]["suffix"] == "-cpu"
    )
    text = WORKFLOW.read_text()
    assert "ghcr.io" in text and "$REGISTRY/$OWNER/moeserve" in text
    assert "GITHUB_STEP_SUMMARY" in text and "steps.build.outputs.digest" in text

    script = "\n".join(s.get("run", "") for _, _, s in steps(wf))
    assert re.search(r"^\s*helm package helm/moeserve .*--app-version", script, re.M), script
    push = re.search(r"^\s*helm push \S+ \"?oci://([^\"\s]+)", script, re.M)
    assert push and push[1].endswith("/charts"), script
