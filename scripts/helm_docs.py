"""Generate the values table of helm/moeserve/README.md from the `# --` comments in values.yaml.

    python scripts/helm_docs.py           # rewrite the table
    python scripts/helm_docs.py --check   # exit 1 if README.md is out of date (make test runs it)

Each value documented with a `# -- text` line directly above it gets a row: its dotted key, its
default (as YAML), and the text. Values without a comment are left out (blocks, mostly).
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "moeserve"
BEGIN, END = "<!-- values:begin -->", "<!-- values:end -->"


def rows(values: Path) -> list[tuple[str, str, str]]:
    data = yaml.safe_load(values.read_text())
    out, path, doc = [], [], ""
    for line in values.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("# --"):
            doc = stripped[4:].strip()
            continue
        if not stripped or stripped.startswith("#") or ":" not in stripped:
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key = stripped.split(":", 1)[0].strip()
        path = [*path[:depth], key]
        if doc:
            node = data
            for k in path:
                node = node[k]
            dumped = yaml.safe_dump(node, default_flow_style=True, width=1000)
            default = dumped.strip().removesuffix("...").strip()
            out.append((".".join(path), default, doc))
            doc = ""
    return out


def table(values: Path) -> str:
    lines = ["| key | default | description |", "|---|---|---|"]
    lines += [f"| `{k}` | `{d}` | {t} |" for k, d, t in rows(values)]
    return "\n".join(lines)


def main() -> int:
    readme = CHART / "README.md"
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{table(CHART / 'values.yaml')}\n{END}{tail}"
    if "--check" in sys.argv:
        if new != text:
            print("helm/moeserve/README.md is out of date: run python scripts/helm_docs.py", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
