"""Generate the Python stubs for proto/moeserve/v1/*.proto into services/proto/.

python scripts/gen_proto.py           # regenerate
python scripts/gen_proto.py --check   # fail if the committed stubs differ (CI drift check)
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "services" / "proto"
PACKAGE = "services.proto"


def generate(out: Path) -> list[Path]:
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    generated = sorted(p for p in out.rglob("*") if p.suffix in (".py", ".pyi"))
    for path in generated:
        # protoc writes absolute imports rooted at proto/; root them at our package instead.
        text = re.sub(r"^from moeserve\.", f"from {PACKAGE}.moeserve.", path.read_text(), flags=re.M)
        path.write_text(text)
    for d in {p.parent for p in generated} | {out / "moeserve"}:
        (d / "__init__.py").touch()
    (out / "__init__.py").write_text(
        '"""Generated gRPC stubs (scripts/gen_proto.py); never edit by hand."""\n'
    )
    return sorted(out.rglob("*.py*"))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    if not args.check:
        shutil.rmtree(OUT, ignore_errors=True)
        OUT.mkdir(parents=True)
        generate(OUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        names = {p.relative_to(tmp) for p in fresh}
        committed = {p.relative_to(OUT) for p in OUT.rglob("*.py*")} if OUT.exists() else set()
        drift = sorted(str(n) for n in names ^ committed)
        drift += sorted(
            str(n) for n in names & committed if not filecmp.cmp(Path(tmp) / n, OUT / n, shallow=False)
        )
    if drift:
        print(
            f"generated stubs are out of date: {', '.join(drift)}; run python scripts/gen_proto.py",
            file=sys.stderr,
        )
        return 1
    print("generated stubs match proto/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
