"""The topology module: commands read topic names from it without loading the data plane, and no
module of the package is part of an import cycle."""

from __future__ import annotations

import ast
import importlib.util
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import ingest
from ingest.topology import TopicNames, partition_for


def _modules_loaded_by(code: str) -> set[str]:
    """The `ingest` modules a fresh interpreter has loaded after running `code`."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('ingest'))))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120)
    return set(json.loads(out.stdout.splitlines()[-1]))


def test_commands_read_topic_names_without_loading_the_pipeline_or_the_catalogue() -> None:
    loaded = _modules_loaded_by(
        "import ingest.commands.status, ingest.commands.specs\n"
        "from ingest.topology import TopicNames, partition_for\n"
        "names = TopicNames('acme')\n"
        "assert (names.state, names.specs, names.worker_group) == ('acme.state', 'acme.specs', 'acme.workers')\n"
        "partition_for('acme/calls', 12)\n")
    assert "ingest.commands.status" in loaded
    assert not {"ingest.data.pipeline", "ingest.data.catalogue", "ingest.worker.runtime"} & loaded, sorted(loaded)


def test_the_command_modules_import_nothing_of_the_data_plane_or_the_worker() -> None:
    # Their heavy imports are inside functions: read the source for every import of them.
    for name in ("status.py", "specs.py"):
        source = (Path(ingest.__file__).parent / "commands" / name).read_text()
        assert "ingest.data" not in source and "ingest.worker" not in source, name


def test_output_topics_load_the_catalogue_when_first_asked_for() -> None:
    names = TopicNames("acme", {"presence": "acme-presence-v2"})
    assert names.for_family("presence") == "acme-presence-v2"
    assert "acme.dead-letter" in names.all_output_topics()
    assert partition_for("acme/calls", 12) == partition_for("acme/messages", 12)  # one account, one partition


def _module_level_imports(path: Path, module: str, known: set[str]) -> set[str]:
    """The package's modules that `module` imports when it is loaded (not inside functions, not
    under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module if node.level == 0 else module.rsplit(".", node.level)[0] + "." + node.module
            found |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return {name for name in found if name in known and name != module}


def test_no_module_is_part_of_an_import_cycle() -> None:
    names = ["ingest", *(m.name for m in pkgutil.walk_packages(ingest.__path__, "ingest."))]
    paths = {name: Path(str(getattr(importlib.util.find_spec(name), "origin", ""))) for name in names}
    graph = {name: _module_level_imports(path, name, set(paths)) for name, path in paths.items()}
    cycles: list[list[str]] = []

    def visit(name: str, stack: list[str], done: set[str]) -> None:
        if name in stack:
            cycles.append([*stack[stack.index(name):], name])
            return
        if name in done:
            return
        for imported in sorted(graph[name]):
            visit(imported, [*stack, name], done)
        done.add(name)

    finished: set[str] = set()
    for name in sorted(graph):
        visit(name, [], finished)
    assert len(graph) > 40 and graph["ingest.worker.runtime"]
    assert cycles == []
