"""The package's shape, read from the source (every import statement, function-level ones
included): no import cycles, product code never imports the test helpers, and neither tests
nor other modules import a private name of another module."""

import ast
import os
from typing import Dict, List, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRIVATE_OK = {("megalora.extension", "megalora._C")}
"""(importer, imported): the one module allowed to load the compiled extension."""


def _modules(folder: str) -> Dict[str, str]:
    """Dotted module name -> path, for every .py file under ``folder`` (relative to ROOT)."""
    out = {}
    for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return out


def _imports(name: str, path: str) -> List[Tuple[str, int]]:
    """(imported dotted name, line) for every import in the file; ``from a import b`` yields
    both ``a`` and ``a.b`` (b may be a module or a name)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _resolve(dotted: str, known: Dict[str, str]) -> str:
    """The longest prefix of ``dotted`` that is a known module ("" for none)."""
    while dotted and dotted not in known:
        dotted = dotted.rpartition(".")[0]
    return dotted


def _graph(known: Dict[str, str]) -> Dict[str, Set[str]]:
    graph = {}
    for name, path in known.items():
        deps = {_resolve(d, known) for d, _ in _imports(name, path)}
        # a module importing its own package (``import megalora`` for the public API) is not a
        # cycle through the package's submodules
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    return graph


def _cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(root):
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif child not in index:
                index[child] = low[child] = counter[0]
                counter[0] += 1
                stack.append(child)
                on.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on:
                low[node] = min(low[node], index[child])

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_import_cycles_in_the_package():
    known = _modules("megalora")
    assert "megalora.umm.train" in known and "megalora.umm.session" in known
    assert _cycles(_graph(known)) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_product_code_does_not_import_the_test_helpers():
    known = _modules("megalora")
    bad = [f"{name} line {line}: {dotted}" for name, path in known.items()
           if not name.startswith("megalora.testing")
           for dotted, line in _imports(name, path)
           if dotted == "megalora.testing" or dotted.startswith("megalora.testing.")]
    assert bad == []


def _private_imports(folder: str) -> List[str]:
    known = _modules("megalora")
    bad = []
    for name, path in _modules(folder).items():
        for dotted, line in _imports(name, path):
            if not dotted.startswith("megalora"):
                continue
            owner, _, leaf = dotted.rpartition(".")
            private = leaf.startswith("_") and not leaf.startswith("__")
            # a private name of another module (its own module's privates are its own)
            if private and owner != name and (name, dotted) not in PRIVATE_OK \
                    and _resolve(owner, known):
                bad.append(f"{name} line {line}: {dotted}")
    return bad


def test_no_module_imports_a_private_name_of_another():
    assert _private_imports("megalora") == []


def test_no_test_imports_a_private_name():
    assert _private_imports("tests") == []


def test_test_files_have_unique_names():
    """Test files are imported by their basename (pytest.ini: no __init__.py, the default import
    mode, which the spawned workers of multi-rank tests rely on): two with the same name in
    different folders would collide."""
    names = [os.path.basename(path) for path in _modules("tests").values()]
    assert sorted(n for n in set(names) if names.count(n) > 1) == []
    assert sum(n.startswith("test_") for n in names) > 30  # it does walk the subfolders
