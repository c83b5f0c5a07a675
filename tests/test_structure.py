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


def test_a_stage_config_travels_downwards_only(tmp_path):
    """Every call that carries grpo.train's config (the stage's Config, or the RolloutConfig made of it), traced
    through one step and its held-out evaluation, goes from a module to one at its level or below: stage files,
    then rollout.py, then tools.py and toy/, then common/. No lower module calls back up with it."""
    import dataclasses
    import functools
    import sys
    import threading

    import grpo
    level = {"rollout": 1, "tools": 2, "toy": 2, "common": 3}

    @functools.lru_cache(maxsize=None)
    def module_level(filename):
        path = Path(filename).resolve()
        if REPO not in path.parents or not path.is_file():  # a library's, or generated code ("<string>")
            return None
        return level.get(path.relative_to(REPO).parts[0].removesuffix(".py"), 0)

    edges = set()

    def profile(frame, event, arg):  # a trace function: called once per Python call, never per line (None)
        if frame.f_back is None:
            return
        callee, caller = module_level(frame.f_code.co_filename), module_level(frame.f_back.f_code.co_filename)
        if callee is None or caller is None:
            return
        code = frame.f_code
        args = [frame.f_locals.get(n) for n in code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]]
        if any(dataclasses.is_dataclass(a) and type(a).__name__ in ("Config", "RolloutConfig") for a in args):
            edges.add((frame.f_back.f_code.co_filename, frame.f_back.f_code.co_name, caller,
                       code.co_filename, code.co_name, callee))

    cfg = grpo.Config(steps=1, prompts_per_step=2, n_samples=2, eval_every=0, eval_before_train=False,
                      eval_prompts=2, eval_n=1, max_response_tokens=48, out_dir=str(tmp_path / "run"))
    threading.settrace(profile)
    sys.settrace(profile)
    try:
        grpo.train(cfg, "toy-student")
    finally:
        sys.settrace(None)
        threading.settrace(None)
    assert len(edges) > 10, edges  # the trace saw the walk
    upwards = [e for e in edges if e[5] < e[2]]
    assert not upwards, upwards
