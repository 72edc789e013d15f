"""The layout's rules (README, Development), read from the code's own imports: imports point down the
layers only, `pipeline` and `trainers` never import each other, no circle joins files of different
folders (nor files of one folder), and folders and files stay small."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; packages on one layer never import each other.
LAYERS = (
    ("manifests",),
    ("core",),
    ("storage",),
    ("kernels", "inputs", "world"),
    ("feature_cache",),
    ("methods",),
    ("pipeline", "trainers"),
    ("cli",),
)
LAYER = {package: depth for depth, packages in enumerate(LAYERS) for package in packages}
MAX_FILES_PER_FOLDER = 15
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Every module of the project's packages, by dotted name."""
    found = {}
    for package in LAYER:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """The nodes under `if TYPE_CHECKING:`: imports for annotations, never run."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)]
    return {sub for block in blocks for stmt in block.body for sub in ast.walk(stmt)}


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports when it runs, at any depth of the file (function-local ones
    included; those under `if TYPE_CHECKING:` are for annotations only)."""
    out = set()
    tree = ast.parse(path.read_text())
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        out.update(name for name in names if name in known)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name} for name, path in known.items()}


def upward_imports(edges: dict[str, set[str]]) -> list[str]:
    """Imports that break rule 1; an entry point (`__main__`) may import the layer that runs it."""
    bad = []
    for importer, targets in edges.items():
        if importer.endswith("__main__"):
            continue
        top = importer.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != top and LAYER[other] >= LAYER[top]:
                bad.append(f"{importer} -> {target}")
    return sorted(bad)


def folder_circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of folders (a folder is a module's package) larger than one folder."""
    folder = {name: name.rpartition(".")[0] if "." in name else name for name in edges}
    for name in edges:  # a package's __init__ belongs to the package's own folder
        if (ROOT / Path(*name.split(".")) / "__init__.py").exists():
            folder[name] = name
    links: dict[str, set[str]] = defaultdict(set)
    for importer, targets in edges.items():
        for target in targets:
            if folder[target] != folder[importer]:
                links[folder[importer]].add(folder[target])
    return [sorted(group) for group in strongly_connected(set(folder.values()), links) if len(group) > 1]


def strongly_connected(nodes: set[str], links: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm, iterative."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for root in sorted(nodes):
        if root in index:
            continue
        work = [(root, iter(sorted(links.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(links.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                groups.append(group)
    return groups


def test_imports_point_down_only():
    assert upward_imports(graph()) == []


def test_no_circle_joins_files_of_different_folders():
    assert folder_circles(graph()) == []


def test_no_function_local_import_hides_a_circle():
    """Rule 4: not even files of one folder import each other in a circle (a function-local import would
    hide one from Python, not from this check)."""
    edges = graph()
    assert [sorted(group) for group in strongly_connected(set(edges), edges) if len(group) > 1] == []


def test_folders_and_files_stay_small():
    crowded = {
        str(folder.relative_to(ROOT)): count
        for package in LAYER
        for folder in [ROOT / package, *(ROOT / package).rglob("*")]
        if folder.is_dir() and (count := len(list(folder.glob("*.py")))) > MAX_FILES_PER_FOLDER
    }
    long = {
        str(path.relative_to(ROOT)): n
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert (crowded, long) == ({}, {})


def test_the_checker_sees_an_upward_import_and_a_circle():
    """The rules above would fail on a layout that breaks them (a checker that cannot fail is no check)."""
    edges = {
        "core.paths": {"pipeline.run"},  # up two layers
        "pipeline.run": {"trainers.engine.loop"},  # a peer
        "trainers.engine.loop": {"core.paths"},
    }
    assert upward_imports(edges) == [
        "core.paths -> pipeline.run",
        "pipeline.run -> trainers.engine.loop",
    ]
    assert folder_circles(edges) == [["core", "pipeline", "trainers.engine"]]
