"""The import graph of ``fedkseed/``: no upward import between layers, no cycle between modules.

The layers are read from the fenced ``layers`` block of docs/architecture.md (one place). Every
``import`` statement counts: top-level, inside functions, under ``if TYPE_CHECKING``, relative
and absolute. The checker itself is tested on planted violations, so a broken checker cannot
pass silently.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Iterable

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
ROOT = "fedkseed"


# ---------------------------------------------------------------------------------- the checker
def read_layers(markdown: str) -> dict[str, int]:
    """Module name -> rank, from the fenced ```layers block (``name`` or ``name:N``)."""
    match = re.search(r"^```layers\n(.*?)^```", markdown, re.M | re.S)
    if match is None:
        raise ValueError("no ```layers block")
    ranks: dict[str, int] = {}
    for line in match.group(1).splitlines():
        if not line.strip():
            continue
        rank, *names = line.split()
        for entry in names:
            name = entry.split(":")[0]
            if name in ranks:
                raise ValueError(f"{name} is placed twice")
            ranks[name] = int(rank)
    return ranks


def read_ceilings(markdown: str) -> dict[str, int]:
    """Module name -> the highest layer it may import, for the entries written ``name:N``."""
    match = re.search(r"^```layers\n(.*?)^```", markdown, re.M | re.S)
    if match is None:
        raise ValueError("no ```layers block")
    entries = (entry for line in match.group(1).splitlines() for entry in line.split()[1:])
    return {name: int(ceiling) for name, _, ceiling in (e.partition(":") for e in entries) if ceiling}


def rank_of(module: str, ranks: dict[str, int]) -> int | None:
    """The rank of the longest table name covering ``module``; the root covers only itself."""
    best = None
    for name in ranks:
        covers = module == name or (name != ROOT and module.startswith(name + "."))
        if covers and (best is None or len(name) > len(best)):
            best = name
    return None if best is None else ranks[best]


def modules_of(package_dir: pathlib.Path) -> dict[str, pathlib.Path]:
    """Module name -> source file for every .py file of the package."""
    out = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The package modules ``module`` imports anywhere in its source (``from a import b`` counts
    as importing ``a.b`` when that is a module, else ``a``)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
    return {m for m in found if m == ROOT or m.startswith(ROOT + ".")}


def import_graph(package_dir: pathlib.Path, extra: Iterable[str] = ()) -> dict[str, set[str]]:
    modules = modules_of(package_dir)
    known = set(modules) | set(extra)
    return {m: imports_of(m, p, known) - {m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(graph: dict[str, set[str]], ranks: dict[str, int], ceilings: dict[str, int] | None = None) -> list[str]:
    """Every unplaced module, upward import and cycle, one line each. ``ceilings``: modules that
    may import only up to a lower layer than their own."""
    out = []
    for module in sorted(set(graph) | {t for ts in graph.values() for t in ts}):
        if rank_of(module, ranks) is None:
            out.append(f"{module} is in no layer of docs/architecture.md")
    for module, targets in sorted(graph.items()):
        own = rank_of(module, ranks)
        if own is None:
            continue
        ceiling = rank_of(module, ceilings or {})
        limit, label = (own, f"L{own}") if ceiling is None else (ceiling, f"L{own}, imports up to L{ceiling}")
        for target in sorted(targets):
            theirs = rank_of(target, ranks)
            if theirs is not None and theirs > limit:
                out.append(f"upward import: {module} ({label}) imports {target} (L{theirs})")
    out.extend(f"import cycle: {' -> '.join(c)}" for c in cycles(graph))
    return out


# ---------------------------------------------------------------------------------- the package
ARCHITECTURE = REPO / "docs" / "architecture.md"


def layers() -> dict[str, int]:
    return read_layers(ARCHITECTURE.read_text())


def test_package_respects_the_layers():
    ranks = layers()
    graph = import_graph(REPO / ROOT, extra=ranks)
    assert len(graph) > 30 and graph["fedkseed.fed.client"] >= {"fedkseed.zo"}
    assert problems(graph, ranks, read_ceilings(ARCHITECTURE.read_text())) == []


def test_every_layer_named_in_the_table_exists():
    """A name in the table that matches no module is a stale entry (a renamed module)."""
    modules = set(modules_of(REPO / ROOT)) | {"fedkseed._C"}  # the compiled extension
    for name in layers():
        assert any(m == name or m.startswith(name + ".") for m in modules), name


# --------------------------------------------------------------------------- the checker itself
PLANTED = {
    "fedkseed/__init__.py": "from .low import thing\n",
    "fedkseed/low.py": "import os\n\ndef f():\n    from .high import g  # lazy, upward\n",
    "fedkseed/high/__init__.py": "from . import core\n",
    "fedkseed/high/core.py": "from .. import low\nfrom fedkseed.high import helper\n",
    "fedkseed/high/helper.py": "import fedkseed.high.core\n",  # a cycle inside one layer
    "fedkseed/loose.py": "",
}
PLANTED_LAYERS = "```layers\n0 fedkseed.low fedkseed\n1 fedkseed.high\n```\n"


def planted(tmp_path: pathlib.Path) -> dict[str, set[str]]:
    for name, text in PLANTED.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return import_graph(tmp_path / ROOT)


def test_checker_resolves_every_import_form(tmp_path):
    graph = planted(tmp_path)
    assert graph == {
        "fedkseed": {"fedkseed.low"},
        "fedkseed.low": {"fedkseed.high"},
        "fedkseed.high": {"fedkseed.high.core"},
        "fedkseed.high.core": {"fedkseed.low", "fedkseed.high.helper"},
        "fedkseed.high.helper": {"fedkseed.high.core"},
        "fedkseed.loose": set(),
    }


def test_checker_reports_upward_imports_cycles_and_unplaced_modules(tmp_path):
    found = problems(planted(tmp_path), read_layers(PLANTED_LAYERS))
    assert found == [
        "fedkseed.loose is in no layer of docs/architecture.md",
        "upward import: fedkseed.low (L0) imports fedkseed.high (L1)",
        "import cycle: fedkseed.high -> fedkseed.high.core -> fedkseed.high.helper -> fedkseed.low",
    ]


def test_checker_finds_a_two_module_cycle_and_accepts_a_clean_graph():
    ranks = {"fedkseed.a": 0, "fedkseed.b": 0}
    assert problems({"fedkseed.a": {"fedkseed.b"}, "fedkseed.b": {"fedkseed.a"}}, ranks) == [
        "import cycle: fedkseed.a -> fedkseed.b"
    ]
    assert problems({"fedkseed.a": {"fedkseed.b"}, "fedkseed.b": set()}, ranks) == []


def test_checker_applies_a_ceiling():
    table = "```layers\n0 fedkseed.low\n1 fedkseed.mid\n2 fedkseed.top fedkseed.side:0\n```\n"
    graph = {"fedkseed.side": {"fedkseed.low", "fedkseed.mid"}, "fedkseed.top": {"fedkseed.mid"}}
    assert read_ceilings(table) == {"fedkseed.side": 0}
    assert problems(graph, read_layers(table), read_ceilings(table)) == [
        "upward import: fedkseed.side (L2, imports up to L0) imports fedkseed.mid (L1)"
    ]


def test_layer_table_rejects_a_module_placed_twice():
    with pytest.raises(ValueError, match="placed twice"):
        read_layers("```layers\n0 fedkseed.a\n1 fedkseed.a\n```\n")
