"""The house rules that a reader relies on: no import circles (a module never imports one that imports it back,
directly or through others, lazy imports inside functions included) and no file over ~400 lines."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nanospec_core"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """nanospec_core modules that `path` imports anywhere in its body (relative imports resolved)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("nanospec_core"):
                found.add(target)
                for alias in node.names:  # `from .models import eagle` imports a module too
                    found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nanospec_core"))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name} for name, path in modules.items()}


def test_no_import_circles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_lazy_imports():
    edges = graph()
    assert "nanospec_core.session" in edges["nanospec_core.bench.runner"]  # imported inside run()
    assert "nanospec_core.models.eagle" in edges["nanospec_core.models.eagle_checkpoint"]


TOOLING = ("nanospec_core.bench", "nanospec_core.training", "nanospec_core.__main__", "nanospec_core.cli_args",
           "nanospec_core.space",
           "nanospec_core.views")


def test_the_runtime_never_imports_the_tooling_or_the_views():
    """Benchmark, training and presentation code sit apart: a runtime module (what a library user imports) reaches
    none of them, so they can grow without weighing on a decode."""
    edges = graph()
    runtime = [m for m in edges if not m.startswith(TOOLING)]
    assert "nanospec_core.session" in runtime and "nanospec_core.decoding.engine" in runtime
    assert "nanospec_core.views.ui" in edges and "nanospec_core.views.ui" not in runtime
    leaks = {m: sorted(t for t in edges[m] if t.startswith(TOOLING)) for m in runtime}
    assert not {m: t for m, t in leaks.items() if t}, leaks


def test_no_file_is_much_over_400_lines():
    long = {str(p.relative_to(PACKAGE.parent)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 420}
    assert not long, long


def test_readme_layout_table_matches_the_tree():
    """Every module of the package is named in the README's layout table, and every path it names exists."""
    import re

    readme = (PACKAGE.parent / "README.md").read_text()
    lines = readme[readme.index("## Layout"):].splitlines()[1:]
    table = "\n".join(line for line in lines[: next((i for i, l in enumerate(lines) if l.startswith("#")),
                                                     len(lines))] if line.startswith("|"))
    named = set(re.findall(r"`([\w./<>-]+)`", table))
    modules = {p.name for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    missing = sorted(m for m in modules if not any(n.endswith(m) for n in named))
    assert not missing, f"modules missing from the README layout table: {missing}"
    for path in (n for n in named if "/" in n and "<" not in n):
        assert (PACKAGE.parent / path).exists(), f"README layout names {path}, which does not exist"
