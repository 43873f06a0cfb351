"""The package's shape: no import cycles, the pure core imports no I/O layer, and the
control planes depend on the control API (the contracts are in pyproject.toml)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "closedloop"


def import_graph() -> dict[str, set[str]]:
    """Module -> the closedloop modules it imports, lazy imports in functions included."""
    mods = {}
    for f in PACKAGE.rglob("*.py"):
        name = ".".join(f.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        mods[name] = f

    def resolve(dotted: str) -> str | None:
        while dotted and dotted not in mods:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t.startswith("closedloop"):
                    r = resolve(t)
                    if r is not None and r != m:
                        graph[m].add(r)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles() -> None:
    graph = import_graph()
    assert "closedloop.control.service" in graph
    assert "closedloop.control.api" in graph["closedloop.mqtt.plane"]
    assert cycles(graph) == []


def test_the_import_contracts_hold() -> None:
    cli = pytest.importorskip("importlinter.cli", reason="import-linter (the test extra)")
    assert cli.lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True,
                            no_logo=True) == 0


def test_every_refusal_reason_is_an_enumerated_and_documented_one() -> None:
    """The layers name their reasons in enumerations (no free strings in the gate, the
    gated stimulator, the policy or the pipeline), and each has its explanation."""
    from closedloop.control.refusals import LAYERS  # noqa: PLC0415

    for _, _, _, docs in LAYERS:
        assert docs and all(text.strip() for text in docs.values())
        assert set(docs) == set(type(next(iter(docs))))  # every member is explained
    for name in ("stim/rules.py", "stim/safety.py", "stim/gated.py",
                 "control/trigger_policy.py", "control/pipeline.py"):
        source = (PACKAGE / name).read_text(encoding="utf-8")
        tree = ast.parse(source)
        enums = [c for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
                 and any(ast.unparse(b) == "StrEnum" for b in c.bases)]
        inside = {id(n) for c in enums for n in ast.walk(c)}
        literals = {n.value for n in ast.walk(tree)
                    if isinstance(n, ast.Constant) and isinstance(n.value, str)
                    and id(n) not in inside and not _is_docs_key(n, tree)}
        free = {s for s in literals if s.startswith("safety:")}
        if name.startswith("control/"):
            free |= literals & {"disarmed", "min_interval", "amplitude_unknown",
                                "amplitude_below_gate", "low_confidence", "target_phase",
                                "open_loop", "scheduler_busy", "eeg_timestamps"}
        else:
            free |= literals & {"late", "device_fault", "device_not_ready", "fire_failed"}
        assert not free, (name, free)


def _is_docs_key(node: ast.AST, tree: ast.Module) -> bool:
    """A string in a ``*_DOCS`` table (the explanations, not reasons)."""
    for stmt in tree.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) \
                and stmt.target.id.endswith("_DOCS") \
                and any(n is node for n in ast.walk(stmt)):
            return True
    return False
