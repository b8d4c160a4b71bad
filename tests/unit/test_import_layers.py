"""The shape of the vfe package: its imports go downward only, in no cycle,
and its modules stay small.

Every import of every module under vfe/ counts -- at the top, inside a
function, inside ``try`` -- except those under ``if TYPE_CHECKING:`` (they
never run).  A function-level import is still an import: hiding a cycle
behind one leaves the cycle.  The layers are tests/unit/import_layers.txt
(the exact form of docs/design.md's rule); the size limit is the one
docs/design.md sets for a module with one job.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "vfe"
LAYERS_FILE = Path(__file__).with_name("import_layers.txt")

#: no module in vfe/ longer than this ...
MAX_LINES = 600
#: ... unless it is here, with the reason (path relative to the repository)
LONG_MODULES: dict[str, str] = {}

#: what vfe may never import: the test suite, and of the qemu namespace
#: anything but pip's qemu.qmp, a real dependency (the test guest is vfe.guest)
FORBIDDEN_PREFIXES = ("tests",)
QEMU_ALLOWED = ("qemu.qmp",)


# -- the layer table -----------------------------------------------------------------

@dataclass(frozen=True)
class Group:
    layer: str
    rank: int                    # the layer's position, lowest first
    names: tuple[str, ...]       # modules/packages it covers


def load_layers() -> list[Group]:
    path = LAYERS_FILE
    ranks: dict[str, int] = {}
    groups = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        assert len(words) >= 2, f"{path.name}:{lineno}: a layer and at least one module"
        layer, names = words[0], tuple(words[1:])
        rank = ranks.setdefault(layer, len(ranks))
        assert rank == len(ranks) - 1, f"{path.name}:{lineno}: layer {layer} is not contiguous"
        groups.append(Group(layer, rank, names))
    return groups


def group_of(module: str, groups: list[Group]) -> Group | None:
    """The group of the longest name covering ``module`` (``vfe`` covers only
    vfe/__init__.py, so that a new package must be placed on purpose)."""
    best, best_len = None, -1
    for g in groups:
        for name in g.names:
            covers = module == name or (name != "vfe" and module.startswith(name + "."))
            if covers and len(name) > best_len:
                best, best_len = g, len(name)
    return best


# -- the import graph ----------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def vfe_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom and literal importlib.import_module() call,
    skipping the bodies of ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.Call) and _is_import_module(node):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _is_import_module(call: ast.Call) -> bool:
    f = call.func
    named = (isinstance(f, ast.Attribute) and f.attr == "import_module") or \
        (isinstance(f, ast.Name) and f.id in ("import_module", "__import__"))
    return named and bool(call.args) and isinstance(call.args[0], ast.Constant) \
        and isinstance(call.args[0].value, str)


def imported_names(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(imported module, line) for every import in ``path``: ``from X import
    Y`` names X.Y when that is a module, else X; relative imports resolved."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in _import_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            out.append((node.args[0].value, node.lineno))
        elif isinstance(node, ast.Import):
            out.extend((a.name, node.lineno) for a in node.names)
        else:
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known or (target == "qemu" and a.name != "*"):
                    out.append((sub, node.lineno))
                else:
                    out.append((target, node.lineno))
    return out


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    line: int


def import_edges() -> tuple[dict[str, list[Edge]], list[Edge]]:
    """The graph of vfe modules (src -> [edges]), and every edge (vfe's and
    external ones)."""
    modules = vfe_modules()
    known = set(modules)
    graph: dict[str, list[Edge]] = {m: [] for m in modules}
    every = []
    for m, path in modules.items():
        for name, line in imported_names(m, path, known):
            e = Edge(m, name, line)
            every.append(e)
            if name in known and name != m:     # (vfe._engine is compiled: no cycle through it)
                graph[m].append(e)
    return graph, every


def find_cycles(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan),
    each as one cycle through it, starting at its smallest name."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for e in graph[v]:
            w = e.dst
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(sorted(c), graph) for c in components]


def _cycle_in(component: list[str], graph: dict[str, list[Edge]]) -> list[str]:
    """A shortest cycle from the component's first module back to it."""
    members = set(component)
    start = component[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph[v]:
                if e.dst == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return list(reversed(path)) + [start]
                if e.dst in members and e.dst not in prev:
                    prev[e.dst] = v
                    nxt.append(e.dst)
        frontier = nxt
    return component


def _line(graph: dict[str, list[Edge]], src: str, dst: str) -> int:
    return next(e.line for e in graph[src] if e.dst == dst)


# -- the checks ------------------------------------------------------------------------

def cycle_violations() -> list[str]:
    graph, _ = import_edges()
    out = []
    for cycle in find_cycles(graph):
        steps = [f"{a}:{_line(graph, a, b)}" for a, b in zip(cycle, cycle[1:])]
        out.append("cycle (module:line of the import): " + " -> ".join(steps) + f" -> {cycle[-1]}")
    return out


def layer_violations() -> list[str]:
    groups = load_layers()
    modules = vfe_modules()
    _, edges = import_edges()
    out = []
    for m in modules:
        if group_of(m, groups) is None:
            out.append(f"{m}: not placed in {LAYERS_FILE.name}")
    for e in edges:
        src_path = modules[e.src].relative_to(REPO)
        top = e.dst.split(".")[0]
        if top in FORBIDDEN_PREFIXES:
            out.append(f"{src_path}:{e.line}: {e.src} imports {e.dst} (the test suite)")
            continue
        if top == "qemu" and not any(e.dst == a or e.dst.startswith(a + ".") for a in QEMU_ALLOWED):
            out.append(f"{src_path}:{e.line}: {e.src} imports {e.dst} (only pip's qemu.qmp is a dependency)")
            continue
        if top != "vfe":
            continue
        src, dst = group_of(e.src, groups), group_of(e.dst, groups)
        if src is None or dst is None or src is dst:
            continue
        if dst.rank > src.rank:
            out.append(f"{src_path}:{e.line}: {e.src} [{src.layer}] imports {e.dst} [{dst.layer}]: upward")
        elif dst.rank == src.rank:
            out.append(f"{src_path}:{e.line}: {e.src} imports {e.dst}: peers on layer {src.layer}")
    return sorted(set(out))


def long_modules() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(REPO))
        n = len(path.read_text().splitlines())
        if n > MAX_LINES and rel not in LONG_MODULES:
            out.append(f"{rel}: {n} lines (over {MAX_LINES}; split it, or list it in LONG_MODULES with why)")
    return out


def test_no_import_cycles():
    found = cycle_violations()
    assert not found, "import cycles in vfe/:\n" + "\n".join(found)


def test_imports_go_down_the_layers():
    found = layer_violations()
    assert not found, f"imports against {LAYERS_FILE.name}:\n" + "\n".join(found)


def test_no_module_over_the_size_limit():
    found = long_modules()
    assert not found, "\n".join(found)


def test_allowed_long_modules_exist_and_are_long():
    """An allow-list entry for a module that is gone or now short is stale."""
    for rel, why in LONG_MODULES.items():
        assert why, f"{rel}: say why it may be long"
        path = REPO / rel
        assert path.is_file() and len(path.read_text().splitlines()) > MAX_LINES, f"{rel}: drop it from LONG_MODULES"


# -- the checker itself, on small trees ------------------------------------------------

def test_cycle_finder_names_the_cycle():
    g = {m: [] for m in "abcd"}
    for src, dst in (("a", "b"), ("b", "c"), ("c", "a"), ("c", "d")):
        g[src].append(Edge(src, dst, 1))
    assert find_cycles(g) == [["a", "b", "c", "a"]]
    g["c"] = [Edge("c", "d", 1)]
    assert find_cycles(g) == []


def test_layer_table_places_modules():
    groups = load_layers()
    assert group_of("vfe", groups).layer == "leaf"
    assert group_of("vfe.vhost.protocol", groups).names == ("vfe.vhost",)
    assert group_of("vfe._engine", groups).layer == "engine"
    assert group_of("vfe.newthing", groups) is None           # must be placed on purpose
    ranks = {g.layer: g.rank for g in groups}
    assert ranks["leaf"] < ranks["vhost"] < ranks["kernels"] < ranks["engine"] < ranks["devices"] \
        < ranks["rpc"] < ranks["service"] < ranks["cli"] < ranks["harness"]


def test_imports_inside_functions_and_try_count_but_not_type_checking(tmp_path):
    src = tmp_path / "vfe" / "x" / "m.py"
    src.parent.mkdir(parents=True)
    src.write_text(
        "from typing import TYPE_CHECKING\n"
        "try:\n    import vfe.a\nexcept ImportError:\n    pass\n"
        "def f():\n    from vfe.b import thing\n    from . import sib\n"
        "if TYPE_CHECKING:\n    import vfe.c\n"
        "import importlib\nimportlib.import_module('vfe.d')\n")
    known = {"vfe.x.sib"}
    names = sorted(n for n, _ in imported_names("vfe.x.m", src, known))
    assert names == ["importlib", "typing", "vfe.a", "vfe.b", "vfe.d", "vfe.x.sib"]     # no vfe.c


def test_checks_on_a_small_tree(tmp_path, monkeypatch):
    """A tree with one of each fault: every one is reported, and nothing else."""
    files = {
        "vfe/__init__.py": "",
        "vfe/low/__init__.py": "",
        "vfe/low/a.py": "import vfe.high.b\n",                 # upward
        "vfe/high/__init__.py": "",
        "vfe/high/b.py": "def f():\n    from vfe.low import a\n",  # down, but a cycle with low.a
        "vfe/high/c.py": "from vfe.peer import d\nimport tests.helpers\nfrom qemu import vm, qmp\n",
        "vfe/peer/__init__.py": "",
        "vfe/peer/d.py": "x = 1\n" * (MAX_LINES + 1),
        "vfe/lost.py": "",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "layers.txt").write_text("leaf vfe\nlow vfe.low\nhigh vfe.high\nhigh vfe.peer\n")
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "REPO", tmp_path)
    monkeypatch.setattr(this, "PACKAGE", tmp_path / "vfe")
    monkeypatch.setattr(this, "LAYERS_FILE", tmp_path / "layers.txt")
    assert cycle_violations() == [
        "cycle (module:line of the import): vfe.high.b:2 -> vfe.low.a:1 -> vfe.high.b"]
    assert layer_violations() == sorted([
        "vfe.lost: not placed in layers.txt",
        "vfe/low/a.py:1: vfe.low.a [low] imports vfe.high.b [high]: upward",
        "vfe/high/c.py:1: vfe.high.c imports vfe.peer.d: peers on layer high",
        "vfe/high/c.py:2: vfe.high.c imports tests.helpers (the test suite)",
        "vfe/high/c.py:3: vfe.high.c imports qemu.vm (only pip's qemu.qmp is a dependency)",
    ])
    assert long_modules() == [f"vfe/peer/d.py: {MAX_LINES + 1} lines (over {MAX_LINES}; split it, "
                              f"or list it in LONG_MODULES with why)"]
