"""The shape of the code: modules import downwards only. Stage files and the story modules (rollout.py,
tools.py) sit on top; toy/ is the embedded task they choose to use; common/ is plumbing below them all, and
never imports a module above it or the toy. No two modules import each other, directly or through others,
lazy imports (inside functions) included."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("common", "toy")


def project_modules() -> dict[str, Path]:
    files = [*REPO.glob("*.py"), *(p for pkg in PACKAGES for p in (REPO / pkg).glob("*.py"))]
    return {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in files}


def imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules a file imports, anywhere in it (a function's lazy import too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and not n.endswith("__init__")}
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(path, modules) - {name} for name, path in modules.items()}


def test_no_module_imports_itself_through_others():
    g = graph()

    def reaches(start, goal):
        seen, todo = set(), list(g[start])
        while todo:
            m = todo.pop()
            if m == goal:
                return True
            if m not in seen:
                seen.add(m)
                todo += g.get(m, ())
        return False
    cycles = sorted(m for m in g if reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


def test_common_imports_neither_the_toy_nor_anything_above_it():
    for name, deps in graph().items():
        if name.startswith("common."):
            above = sorted(d for d in deps if not d.startswith("common."))
            assert not above, f"{name} imports {above}"
