"""No import cycles among `sglang_duet/server` and `sglang_duet/disagg` (issue 16: the old
`server/scheduler_proc.py` <-> `disagg/scheduler.py` and `disagg/transfer.py` <-> `disagg/cuda_ipc.py`
cycles must stay gone, and no new one may appear). Read from the sources' import statements,
wherever they are (inside functions too), so an import that only runs later still counts; imports
under `if TYPE_CHECKING:` are left out, since they never run."""
from __future__ import annotations

import ast
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("sglang_duet/server", "sglang_duet/disagg")


def _modules() -> dict[str, str]:
    """{dotted module name: source path} of the two packages."""
    mods = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(REPO, pkg)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    mods[dotted.removesuffix(".__init__")] = path
    return mods


def _imported_names(module: str, path: str, node: ast.AST) -> list[str]:
    """Every name an import statement could load: `from a.b import c` may load a.b or a.b.c."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: resolve against the module's package
        package = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for module, path in mods.items():
        tree = ast.parse(open(path).read(), path)
        type_only = {id(n) for block in ast.walk(tree)
                     if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
                     for stmt in block.body for n in ast.walk(stmt)}
        graph[module] = {name for node in ast.walk(tree)
                         if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in type_only
                         for name in _imported_names(module, path, node) if name in mods and name != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_server_and_disagg_have_no_import_cycle():
    graph = import_graph()
    assert "sglang_duet.server.scheduler_proc" in graph and "sglang_duet.disagg.cuda_ipc" in graph
    assert "sglang_duet.disagg.kv_transport" in graph["sglang_duet.disagg.cuda_ipc"]  # edges are read
    assert cycles(graph) == []
    assert [(a, b) for a, deps in graph.items() for b in deps
            if a.startswith("sglang_duet.server") and b.startswith("sglang_duet.disagg")] == []
