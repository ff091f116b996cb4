"""The values table of helm/ingest/README.md, generated from the `# --` comments of values.yaml.

A value is documented by a comment block that starts with `# -- ` right above its key (continuation
lines are plain `# ` comments). `python tests/integration/helm/values_table.py` rewrites the table between the
README's markers; tests/integration/test_helm.py checks that the README is up to date.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[3] / "helm" / "ingest"
BEGIN = "<!-- values-table:begin -->"
END = "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-]+):(?:\s|$)")


def documented_values(values_text: str) -> list[tuple[str, str]]:
    """(dotted key path, description) for every key with a `# --` comment, in file order."""
    out: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    pending: list[str] | None = None
    for line in values_text.splitlines():
        stripped = line.strip()
        if stripped.startswith("# -- "):
            pending = [stripped[len("# -- "):]]
            continue
        if stripped.startswith("#"):
            if pending is not None:
                pending.append(stripped.lstrip("#").strip())
            continue
        m = _KEY.match(line)
        if not m or line.lstrip().startswith("- "):
            pending = None if not stripped else pending
            continue
        indent = len(m.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [m.group("key")])
        if pending is not None:
            out.append((path, " ".join(pending)))
            pending = None
        stack.append((indent, m.group("key")))
    return out


def _lookup(values: dict[str, Any], path: str) -> Any:
    """Follow a dotted path; keys that contain dots themselves (`bootstrap.servers`) are tried whole."""
    node: Any = values
    parts = path.split(".")
    i = 0
    while i < len(parts):
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if isinstance(node, dict) and key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(path)
    return node


def _type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]


def table(chart: Path = CHART) -> str:
    text = (chart / "values.yaml").read_text(encoding="utf-8")
    values = yaml.safe_load(text)
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for path, description in documented_values(text):
        value = _lookup(values, path)
        default = json.dumps(value, separators=(",", ":")).replace("|", "\\|")
        text_ = description.replace("|", "\\|")
        rows.append(f"| `{path}` | {_type(value)} | `{default}` | {text_} |")
    return "\n".join(rows)


def rewrite_readme(chart: Path = CHART) -> bool:
    """Replace the table between the markers; True when the README changed."""
    readme = chart / "README.md"
    text = readme.read_text(encoding="utf-8")
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    new = text[:start] + "\n" + table(chart) + "\n" + text[end:]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    print("README.md updated" if rewrite_readme() else "README.md already up to date", file=sys.stderr)
