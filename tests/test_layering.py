"""The package's layering, read from the source with ``ast`` (nothing is imported).

A *part* is the first path component under ``ipadapter_jax/`` (the file stem
for a single-file module; ``__init__`` for the package root
``ipadapter_jax/__init__.py``). Parts are layered, lowest first, as in ``LAYERS``:

(a) a module imports package modules only from its own part or parts below it
    (``models`` and ``schedulers`` share a level but do not import each other);
    ``__main__.py`` modules and ``if __name__ == "__main__":`` blocks are CLI
    entry points and may import anything;
(b) no function-local (or class-body) imports of package modules: every
    package import is at module level (``if TYPE_CHECKING:`` blocks included),
    except in ``LAZY_IMPORT_PARTS`` (the command lines, which check their
    arguments before JAX loads) and a package ``__init__`` importing its own
    part's modules on first use (PEP 562 ``__getattr__``); lazy re-exports of
    other modules name them in a ``_LAZY`` table, checked by (e);
(c) the graph of imports between parts is acyclic;
(d) the package imports nothing from outside it but the standard library and
    installed third-party distributions (never ``tests``, ``sample``, ...);
(e) a ``_LAZY`` table (name -> module) in a package ``__init__`` names only
    modules of its own part or of lower parts, and each exists.

Adding a part means adding it to ``LAYERS``: an unknown part fails (a).
"""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "ipadapter_jax"
ROOT_PART = "__init__"  # the part of the package root, ipadapter_jax/__init__.py

# Lowest first; parts in one tuple share a level.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("io",),
    ("models", "schedulers"),
    ("families",),  # one record per base model: detection, components, key maps, text conditioning
    ("ip_adapter",),
    ("convert",),
    ("pipeline",),
    ("training",),
    ("demo",),
    ("eval",),
    ("parity",),   # the parity toolkit: comparison code shared with the tests
    ("cli",),      # the command lines: argument checks before JAX, user errors as one line
    (ROOT_PART,),  # the package root (lazy: PEP 562)
)
# Parts whose functions may import package modules: the command lines check their
# arguments before JAX loads, then import the heavy parts (DESIGN.md: cli/).
LAZY_IMPORT_PARTS = frozenset({"cli"})
# Parts of one level that still must not import each other.
FORBIDDEN_SAME_LEVEL = {("models", "schedulers"), ("schedulers", "models")}
# Import names of declared (possibly optional, possibly not installed here) dependencies
# whose import name differs from the distribution name.
IMPORT_NAME_ALIASES = {"pillow": "PIL", "orbax-checkpoint": "orbax", "opencv-python-headless": "cv2"}


@dataclass(frozen=True)
class Import:
    module: str        # importing module's path relative to the repo, e.g. ipadapter_jax/models/unet.py
    line: int
    source: str        # the import statement as written
    target: str        # the imported module's dotted name (for `from a import b`: a.b when b is a module)
    local: bool        # inside a function / class body / lambda
    type_checking: bool  # inside an `if TYPE_CHECKING:` block
    entry_point: bool = False  # inside an `if __name__ == "__main__":` block

    def where(self) -> str:
        return f"{self.module}:{self.line}: `{self.source}`"


def level_of(part: str) -> int | None:
    return next((i for i, level in enumerate(LAYERS) if part in level), None)


def part_of_path(path: Path, package_dir: Path) -> str:
    rel = path.relative_to(package_dir)
    if rel.parts == ("__init__.py",):
        return ROOT_PART
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def part_of_module(dotted: str, package: str) -> str:
    parts = dotted.split(".")
    assert parts[0] == package, dotted
    return parts[1] if len(parts) > 1 else ROOT_PART


def module_name(path: Path, package_dir: Path, package: str) -> str:
    rel = path.relative_to(package_dir).with_suffix("")
    names = [package, *rel.parts]
    return ".".join(names[:-1] if names[-1] == "__init__" else names)


def is_package_module(dotted: str, package_dir: Path, package: str) -> bool:
    """Whether ``dotted`` names a module or subpackage file of the package."""
    rel = Path(*dotted.split(".")[1:]) if "." in dotted else Path()
    base = package_dir / rel
    return dotted == package or base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _is_main_guard(test: ast.expr) -> bool:
    """``__name__ == "__main__"``."""
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(path: Path, package_dir: Path, package: str, repo: Path) -> list[Import]:
    """Every import in one file (absolute, relative, and importlib.import_module /
    __import__ with a constant name), with where it sits."""
    text = path.read_text()
    tree = ast.parse(text, filename=str(path))
    is_init = path.name == "__init__.py"
    this = module_name(path, package_dir, package)
    this_package = this if is_init else this.rpartition(".")[0]
    rel_path = path.relative_to(repo).as_posix()
    found: list[Import] = []

    main_lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_guard(node.test):
            main_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))

    def add(node, targets, local, type_checking):
        source = ast.get_source_segment(text, node) or ast.unparse(node)
        source = " ".join(source.split())
        for target in targets:
            found.append(Import(rel_path, node.lineno, source, target, local, type_checking,
                                node.lineno in main_lines))

    def visit(node, local, type_checking):
        for child in ast.iter_child_nodes(node):
            child_local = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                                      ast.Lambda))
            if isinstance(child, ast.Import):
                add(child, [a.name for a in child.names], local, type_checking)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = this_package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    module = ".".join(base + ([child.module] if child.module else []))
                else:
                    module = child.module
                targets = []
                for alias in child.names:
                    sub = f"{module}.{alias.name}"
                    package_sub = module.split(".")[0] == package and alias.name != "*" and \
                        is_package_module(sub, package_dir, package)
                    targets.append(sub if package_sub else module)
                add(child, sorted(set(targets)), local, type_checking)
            elif isinstance(child, ast.Call):
                func = child.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name in ("import_module", "__import__") and child.args and \
                        isinstance(child.args[0], ast.Constant) and isinstance(child.args[0].value, str):
                    add(child, [child.args[0].value], local, type_checking)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit_one(stmt, local, True)
                for stmt in child.orelse:
                    visit_one(stmt, local, type_checking)
                continue
            visit(child, child_local, type_checking)

    def visit_one(stmt, local, type_checking):
        wrapper = ast.Module(body=[stmt], type_ignores=[])
        visit(wrapper, local, type_checking)

    visit(tree, False, False)
    return found


def package_files(package_dir: Path) -> list[Path]:
    return sorted(p for p in package_dir.rglob("*.py") if "__pycache__" not in p.parts)


def all_imports(package_dir: Path, package: str, repo: Path) -> dict[Path, list[Import]]:
    return {path: imports_of(path, package_dir, package, repo) for path in package_files(package_dir)}


# --------------------------------------------------------------------------- rules

def layering_violations(imports: dict[Path, list[Import]], package_dir: Path, package: str) -> list[str]:
    """Rule (a)."""
    out = []
    for path, found in imports.items():
        if path.name == "__main__.py":
            continue
        part = part_of_path(path, package_dir)
        level = level_of(part)
        if level is None:
            out.append(f"{path.relative_to(package_dir.parent).as_posix()}: part {part!r} has no place in "
                       "LAYERS (tests/test_layering.py); add it at its level")
            continue
        for imp in found:
            if imp.target.split(".")[0] != package or imp.entry_point:
                continue
            other = part_of_module(imp.target, package)
            if other == part:
                continue
            other_level = level_of(other)
            if other_level is None:
                out.append(f"{imp.where()}: imports part {other!r}, which has no place in LAYERS")
            elif other_level > level:
                out.append(f"{imp.where()}: part {part!r} (level {level}) imports {imp.target} "
                           f"from the higher part {other!r} (level {other_level})")
            elif (part, other) in FORBIDDEN_SAME_LEVEL:
                out.append(f"{imp.where()}: part {part!r} imports {imp.target} from {other!r}; "
                           "these parts must not import each other")
    return out


def local_import_violations(imports: dict[Path, list[Import]], package: str,
                            lazy_parts: frozenset = LAZY_IMPORT_PARTS) -> list[str]:
    """Rule (b)."""
    out = []
    for path, found in imports.items():
        package_dir = next(p for p in path.parents if p.name == package)
        if part_of_path(path, package_dir) in lazy_parts:
            continue
        part = part_of_path(path, package_dir)
        # A package init may defer its own part's modules (PEP 562 ``__getattr__``).
        own_lazy = lambda imp: path.name == "__init__.py" and part_of_module(imp.target, package) == part
        out += [f"{imp.where()}: function-local import of {imp.target}; import it at module level"
                for imp in found if imp.local and not imp.type_checking and imp.target.split(".")[0] == package
                and not own_lazy(imp)]
    return out


def lazy_table_violations(package_dir: Path, package: str) -> list[str]:
    """Rule (e): every ``_LAZY = {name: module}`` table of a package ``__init__``
    names existing modules of its own part or lower parts."""
    out = []
    for path in package_files(package_dir):
        if path.name != "__init__.py":
            continue
        part = part_of_path(path, package_dir)
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_LAZY" for t in node.targets)):
                continue
            table = _literal_lazy_table(node.value)
            for name, module in table.items():
                where = f"{path.relative_to(package_dir.parent).as_posix()}:{node.lineno}: _LAZY[{name!r}]"
                if not is_package_module(module, package_dir, package):
                    out.append(f"{where}: {module} is not a module of the package")
                    continue
                other = part_of_module(module, package)
                if other != part and (level_of(other) is None or level_of(other) > (level_of(part) or 0)):
                    out.append(f"{where}: {module} is in the higher (or unlayered) part {other!r}")
    return out


def _literal_lazy_table(node: ast.expr) -> dict[str, str]:
    """A ``_LAZY`` dict literal: ``{"name": "module"}`` entries and ``**dict.fromkeys((names), "module")``."""
    table = {}
    if not isinstance(node, ast.Dict):
        return table
    for key, value in zip(node.keys, node.values):
        if key is not None:
            table[ast.literal_eval(key)] = ast.literal_eval(value)
        elif isinstance(value, ast.Call) and getattr(value.func, "attr", None) == "fromkeys":
            for name in ast.literal_eval(value.args[0]):
                table[name] = ast.literal_eval(value.args[1])
    return table


def part_graph(imports: dict[Path, list[Import]], package_dir: Path, package: str) -> dict[str, dict[str, Import]]:
    """{part: {imported part: first such import}}, without ``__main__`` modules and blocks."""
    graph: dict[str, dict[str, Import]] = {}
    for path, found in imports.items():
        if path.name == "__main__.py":
            continue
        part = part_of_path(path, package_dir)
        edges = graph.setdefault(part, {})
        for imp in found:
            if imp.target.split(".")[0] == package and not imp.entry_point:
                other = part_of_module(imp.target, package)
                if other != part:
                    edges.setdefault(other, imp)
    return graph


def cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one part (Tarjan)."""
    index, low, stack, on_stack, result = {}, {}, [], set(), []

    def strongconnect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                strongconnect(w)
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
                result.append(_cycle_in(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return result


def _cycle_in(graph, component: set[str]) -> list[str]:
    """A simple cycle through the component's first part (BFS back to it)."""
    start = min(component)
    paths = {start: [start]}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph.get(v, {})):
            if w == start:
                return paths[v] + [start]
            if w in component and w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {component}")


def cycle_violations(imports, package_dir: Path, package: str) -> list[str]:
    """Rule (c)."""
    graph = part_graph(imports, package_dir, package)
    out = []
    for cycle in cycles(graph):
        edges = "; ".join(f"{a} -> {b} at {graph[a][b].where()}" for a, b in zip(cycle, cycle[1:]))
        out.append(f"import cycle between parts {' -> '.join(cycle)}: {edges}")
    return out


def declared_import_names(repo: Path) -> set[str]:
    """Import names of the distributions pyproject.toml declares (optional ones too)."""
    pyproject = repo / "pyproject.toml"
    if not pyproject.is_file():
        return set()
    project = tomllib.loads(pyproject.read_text()).get("project", {})
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements += extra
    names = set()
    for requirement in requirements:
        dist = re.split(r"[\s<>=!~;\[]", requirement, maxsplit=1)[0].lower()
        names.add(IMPORT_NAME_ALIASES.get(dist, dist.replace("-", "_")))
    return names


def _inside(path: str | None, folder: Path) -> bool:
    if not path or path in ("built-in", "frozen"):
        return False
    try:
        Path(path).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def repository_module_names(repo: Path, package: str) -> set[str]:
    """Names importable from the repository's own files outside the package:
    top-level scripts and folders with Python files, and the test modules."""
    names = set()
    for folder in (repo, repo / "tests"):
        if not folder.is_dir():
            continue
        for entry in folder.iterdir():
            if entry.suffix == ".py":
                names.add(entry.stem)
            elif entry.is_dir() and not entry.name.startswith(".") and entry.name != package and \
                    entry.name.isidentifier() and any(entry.rglob("*.py")):
                names.add(entry.name)
    return names


def outside_import_violations(imports: dict[Path, list[Import]], package: str, repo: Path) -> list[str]:
    """Rule (d): a module outside the package must be the standard library or an
    installed third-party distribution: not a file of this repository (tests,
    scripts), and not something merely importable from the current directory."""
    declared = declared_import_names(repo)
    own = repository_module_names(repo, package)
    out = []
    for found in imports.values():
        for imp in found:
            top = imp.target.split(".")[0]
            if top == package or top in sys.stdlib_module_names or top == "__future__":
                continue
            if top in own:
                out.append(f"{imp.where()}: imports {top!r}, a module of this repository outside the package; "
                           "the package may only import the standard library and installed distributions")
                continue
            spec = importlib.util.find_spec(top)
            if spec is None:
                if top not in declared:
                    out.append(f"{imp.where()}: imports {top!r}, which is neither installed nor a declared "
                               "dependency in pyproject.toml")
                continue
            locations = [spec.origin] + list(spec.submodule_search_locations or [])
            if any(_inside(loc, repo) and not _inside(loc, Path(sys.prefix).resolve()) for loc in locations):
                out.append(f"{imp.where()}: imports {top!r} from this repository ({spec.origin or locations}); "
                           "the package may only import the standard library and installed distributions")
    return out


def _report(violations: list[str], what: str) -> str:
    return f"{len(violations)} {what}:\n" + "\n".join(violations)


# --------------------------------------------------------------------------- the package

@pytest.fixture(scope="module")
def package_imports():
    package_dir = REPO / PACKAGE
    imports = all_imports(package_dir, PACKAGE, REPO)
    assert len(imports) > 10 and sum(map(len, imports.values())) > 50, "found suspiciously few imports"
    return imports


def test_parts_import_only_their_own_or_lower_parts(package_imports):
    violations = layering_violations(package_imports, REPO / PACKAGE, PACKAGE)
    assert not violations, _report(violations, "imports from a higher part (or an unlayered part)")


def test_no_function_local_package_imports(package_imports):
    violations = local_import_violations(package_imports, PACKAGE)
    assert not violations, _report(violations, "function-local imports of package modules")


def test_part_graph_is_acyclic(package_imports):
    violations = cycle_violations(package_imports, REPO / PACKAGE, PACKAGE)
    assert not violations, _report(violations, "cycles in the part graph")


def test_lazy_tables_name_own_or_lower_modules():
    violations = lazy_table_violations(REPO / PACKAGE, PACKAGE)
    assert not violations, _report(violations, "bad lazy re-exports")


def test_no_imports_from_outside_the_package_but_installed_ones(package_imports):
    violations = outside_import_violations(package_imports, PACKAGE, REPO)
    assert not violations, _report(violations, "imports of modules outside the package")


# --------------------------------------------------------------------------- the checker itself

FAKE = {
    "__init__.py": "from pkg.pipeline import run\n",
    "io/__init__.py": "import json\n",
    "io/files.py": "from pkg.models import unet\n",                          # (a): io -> models
    "models/unet.py": ("from typing import TYPE_CHECKING\n"
                       "from . import layers\n"
                       "from pkg.schedulers import ddim\n"                    # (a): models -> schedulers
                       "if TYPE_CHECKING:\n"
                       "    from pkg.io import files\n"
                       "def f():\n"
                       "    from pkg.io import files\n"                       # (b)
                       "    import json\n"),
    "models/layers.py": "import numpy\nif __name__ == \"__main__\":\n    from pkg.pipeline import run\n",  # allowed
    "models/__init__.py": "_LAZY = {\"run\": \"pkg.pipeline.run\", **dict.fromkeys((\"unet\",), \"pkg.models.unet\")}\n",
    "cli/__init__.py": "def main():\n    from pkg.pipeline import run\n",           # allowed: lazy part
    "schedulers.py": "from pkg.io.files import read\nimport tests.helpers\n",  # (d)
    "pipeline/__init__.py": "from .run import run\n",
    "pipeline/run.py": "from ..models import unet\nfrom pkg import io\n",
    "pipeline/__main__.py": "from pkg import adapters\n",                     # allowed: CLI
}


def test_checker_finds_each_kind_of_violation(tmp_path):
    repo = tmp_path
    (repo / "tests").mkdir()
    (repo / "tests" / "helpers.py").write_text("")
    package_dir = repo / "pkg"
    for name, text in FAKE.items():
        (package_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (package_dir / name).write_text(text)
    imports = all_imports(package_dir, "pkg", repo)
    relative = {imp.target for imp in imports[package_dir / "pipeline" / "run.py"]}
    assert relative == {"pkg.models.unet", "pkg.io"}
    layering = layering_violations(imports, package_dir, "pkg")
    local = local_import_violations(imports, "pkg")
    loops = cycle_violations(imports, package_dir, "pkg")
    outside = outside_import_violations(imports, "pkg", repo)
    assert any(v.startswith("pkg/io/files.py:1: `from pkg.models import unet`: part 'io'") for v in layering), layering
    assert any("pkg/models/unet.py:3:" in v and "must not import each other" in v for v in layering), layering
    assert not any("__main__" in v for v in layering + loops), (layering, loops)
    assert local == ["pkg/models/unet.py:7: `from pkg.io import files`: function-local import of pkg.io.files; "
                     "import it at module level"]
    assert len(loops) == 1 and "io -> models -> io" in loops[0] and "pkg/io/files.py:1" in loops[0], loops
    assert len(outside) == 1 and outside[0].startswith("pkg/schedulers.py:2: `import tests.helpers`"), outside
    assert not any("layers.py" in v or "cli/" in v for v in layering + local + loops), (layering, local, loops)
    lazy = lazy_table_violations(package_dir, "pkg")
    assert lazy == ["pkg/models/__init__.py:1: _LAZY['run']: pkg.pipeline.run is in the higher (or unlayered) "
                    "part 'pipeline'"], lazy
