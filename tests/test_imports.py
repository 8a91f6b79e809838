"""The house's floors hold: no import circle among the four packages, no import runs
upward (``tasks`` at the bottom, ``app`` and ``workers`` above it, ``fleet`` on top), and
the worker's Celery process never loads torch (only its engine process does)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tasks", "app", "workers", "fleet")
#: What each floor may import from the project.
MAY_IMPORT = {
    "tasks": {"tasks"},
    "app": {"tasks", "app"},
    "workers": {"tasks", "workers"},
    "fleet": set(PACKAGES),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, at module level or inside a function."""
    modules = {module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from pkg import module`` imports the module; ``from module import name`` the module.
                targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_every_package_and_their_imports():
    """The graph is not vacuous: it holds every module and the edges the layers rely on."""
    graph = import_graph()
    assert {"tasks.jobs", "app.jobs", "workers.engine", "fleet.cli"} <= graph.keys()
    assert "workers.protocol" in graph["workers.engine"] and "tasks.jobs" in graph["app.jobs"]


def test_no_import_circle():
    """No module imports itself through others, lazily inside a function or not."""
    assert cycles(import_graph()) == []


def test_a_circle_is_found():
    """The cycle finder finds one when there is one."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_runs_upward():
    """tasks imports only tasks; app and workers only tasks and themselves; fleet anything."""
    upward = [
        f"{source} -> {target}"
        for source, targets in import_graph().items()
        for target in targets
        if target.split(".")[0] not in MAY_IMPORT[source.split(".")[0]]
    ]
    assert upward == []


def test_the_worker_celery_process_loads_no_torch():
    """Importing the worker's Celery module in a fresh interpreter loads neither torch nor diffusers."""
    code = "import sys, workers.celery; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_importing_the_celery_modules_makes_no_app_and_connects_no_signal():
    """The apps are made by their factories when asked for, not as a side effect of an import."""
    code = (
        "import celery._state as state, celery.signals as signals\n"
        "import tasks.celery, tasks.webhook_worker, workers.celery\n"
        "print(len(state._apps), len(signals.celeryd_after_setup.receivers or []), 'app' in vars(tasks.celery))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0", "False"]
