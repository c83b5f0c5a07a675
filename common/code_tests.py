"""
common/code_tests.py: the grader of code answers, unit tests with partial credit, as the authors' sandbox
wrapper grades them (verl/utils/reward_score/sandbox_fusion/utils.py, livecodebench/code_math.py).

score_code gives the fraction of a problem's tests that the last ```python block of an answer passes;
code_verdicts, pass or fail per test case; check_code_tests, a problem's ground truth read (in every form the
authors' grader reads) and checked; as_class_method, the authors' wrapping of a function into class Solution
(--code_scoring reference). The cases run in parallel in the sandbox (common/sandbox.py) as it is
configured.
"""
import ast
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from common import sandbox

# verl/utils/reward_score/livecodebench/code_math.py
CODE_TEST_TIMEOUT = 30.0
CODE_TEST_MEMORY_MB = 1024
MAX_PARALLEL_CASES = 8

# A function problem ("fn_name") is graded as the authors' sandbox wrapper grades it: the solution behind a
# preamble of star imports (LeetCode-style signatures such as List[int] need them), then a harness that reads
# one JSON value per line of stdin, calls the function (a top-level one, else Solution().fn_name), and prints
# the result: json.dumps for dict, list, tuple, None and bool, str() for anything else. A failure prints
# nothing and exits 0. The printed text is compared with the expected output as a string, after rstrip("\n").
_STAR_IMPORTED = ("string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
                  "statistics", "itertools", "functools", "operator", "io", "sys", "json",
                  "builtins", "typing")
_FUNCTION_PREAMBLE = ("import traceback\n" + "".join(f"from {m} import *\n" for m in _STAR_IMPORTED)
                      + "".join(f"import {m}\n" for m in _STAR_IMPORTED if m not in ("builtins", "typing")))
# The harness is the text below the marker line of common/function_harness.py, FN_NAME standing for fn_name.
_HARNESS_MARKER = "# ---- the harness: everything below this line, byte for byte ----\n"
_FUNCTION_HARNESS = (Path(__file__).with_name("function_harness.py").read_text(encoding="utf-8")
                     .split(_HARNESS_MARKER, 1)[1])


def read_code_tests(tests):
    """A problem's ground truth as the authors' grader reads it: a string is JSON or, failing that, a Python
    literal (check_correctness in verl/utils/reward_score/sandbox_fusion/utils.py runs ast.literal_eval on
    it); anything else is taken as it is."""
    if not isinstance(tests, str):
        return tests
    try:
        return json.loads(tests)
    except json.JSONDecodeError:
        pass
    try:
        return ast.literal_eval(tests)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError("code tests are a string that is neither JSON nor a Python literal") from None


def check_code_tests(tests) -> dict:
    """A code problem's ground truth read (read_code_tests) and checked: {"import_prefix", "test_code",
    "entry_point"} (LeetCode asserts) as it is, or {"inputs", "outputs"[, "fn_name"][, "assert_case"]} with
    the cases as lists; a ValueError says what is wrong with anything else.

    inputs and outputs may each be a list or a string holding a Python list, which check_correctness reads
    with ast.literal_eval; assert_case, one string per case, is code appended to the solution. A problem the
    authors' grader scores the same for every answer (no cases: a division by zero, -1; as many inputs as
    outputs not: 0) teaches nothing and is refused here."""
    tests = read_code_tests(tests)
    if not isinstance(tests, dict):
        raise ValueError(f"code tests must be an object, not a {type(tests).__name__}")
    if {"import_prefix", "test_code", "entry_point"} <= tests.keys():
        return tests
    if "inputs" not in tests or "outputs" not in tests:
        raise ValueError("code tests need `inputs` and `outputs` (or import_prefix, test_code and entry_point)")
    cases = {}
    for key in ("inputs", "outputs"):
        value = tests[key]
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise ValueError(f"code tests: `{key}` is a string that is not a Python literal") from None
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"code tests: `{key}` must be a list (or a string of one), "
                             f"not a {type(value).__name__}")
        cases[key] = list(value)
    if not cases["inputs"]:
        raise ValueError("code tests: no test cases")
    if len(cases["inputs"]) != len(cases["outputs"]):
        raise ValueError("code tests: `inputs` and `outputs` differ in length")
    asserts = tests.get("assert_case", [""] * len(cases["inputs"]))
    if not isinstance(asserts, (list, tuple)) or len(asserts) != len(cases["inputs"]):
        raise ValueError("code tests: `assert_case` must hold one entry per case")
    return {**tests, **cases, "assert_case": list(asserts)}


def _exited_cleanly(result: sandbox.RunResult):
    return result.status == "finished" and result.returncode == 0


def _printed(expected):
    # an expected output of None passes any run that finishes cleanly, as in _process_single_case
    return lambda r: _exited_cleanly(r) and (expected is None
                                             or r.stdout.rstrip("\n") == str(expected).rstrip("\n"))


def _code_cases(code: str, tree, tests: dict):
    """[(program, stdin, passed(result))] for one test spec, or None if the code cannot be tested."""
    if "import_prefix" in tests:
        # LeetCode style, as the reference builds it: check()'s header line glued to each
        # later non-empty line ("def check(candidate):" + "    assert ..." is valid python)
        lines = [line for line in tests["test_code"].split("\n") if line != ""]
        return [(tests["import_prefix"] + code + "\n" + lines[0] + lines[i]
                 + f"\ncheck({tests['entry_point']})", "", _exited_cleanly) for i in range(1, len(lines))]
    # an assert case is appended to the solution of its own test (check_correctness)
    asserts = tests.get("assert_case") or [""] * len(tests["inputs"])
    solutions = [code + "\n\n" + str(a) if a else code for a in asserts]
    if "fn_name" in tests:
        fn = tests["fn_name"]
        defines = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        if "Solution" not in defines and fn not in defines:
            return None  # the reference cannot wrap a missing function into class Solution
        harness = _FUNCTION_HARNESS.replace("FN_NAME", repr(fn))
        return [(_FUNCTION_PREAMBLE + solution + harness, str(inp), _printed(out))
                for solution, inp, out in zip(solutions, tests["inputs"], tests["outputs"])]
    return [(solution, str(inp), _printed(out))
            for solution, inp, out in zip(solutions, tests["inputs"], tests["outputs"])]


def as_class_method(code: str, fn_name: str) -> str | None:
    """The authors' convert_function_to_class_method (verl/utils/reward_score/livecodebench/code_math.py),
    re-typed: the top-level function fn_name (the last one of that name) moves into a class Solution at the
    end of the module, with `self` put first, and the module is written back by ast.unparse (comments
    dropped). None if there is no such function. A call of fn_name by its global name, as in a recursive
    function, then raises NameError."""
    tree = ast.parse(code)
    target, body = None, []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == fn_name:
            target = node
        else:
            body.append(node)
    if target is None:
        return None
    if not (target.args.args and target.args.args[0].arg == "self"):
        target.args.args.insert(0, ast.arg(arg="self", annotation=None))
    body.append(ast.ClassDef(name="Solution", bases=[], keywords=[], body=[target], decorator_list=[]))
    tree.body = body
    return ast.unparse(tree)


def _is_json(text) -> bool:
    try:
        json.loads(text)
        return True
    except (json.JSONDecodeError, TypeError):
        return False


class Score(NamedTuple):
    """A grader's verdict on one answer (this file's score_code, tools.py's math graders and compute_score)."""
    score: float       # the reward: 1 right, -1 wrong (code: the fraction of tests passed), shaped by the caller
    acc: bool          # right: every test passed, or the box matched
    pred: str | None   # what was graded: the boxed answer or the code; None if there was nothing to grade


def score_code(solution_str: str, tests, *, code_scoring: str = "fixed",
               timeout: float = CODE_TEST_TIMEOUT) -> Score:
    """The fraction of unit tests the last ```python block passes
    (verl/utils/reward_score/livecodebench/code_math.py: compute_score).

    code_scoring="fixed" reads the text after the last </think> and runs the code as written; a function
    problem calls the top-level function, or else Solution().fn_name. "reference" keeps the authors'
    behaviour (docs/deviations.md rows 2-4, 21, 22): split("</think>")[1] (the text between the first two), every
    "\\n" escape turned into a line break (which breaks print("\\n".join(...))); their str() of the tests
    read back with json.loads, so tests that are not JSON text (an object, a Python literal) score -1 on a
    function problem whose code has no class Solution, and on every LeetCode-assert problem; a function
    problem's top-level function moved into class Solution (as_class_method); and the tests read with
    ast.literal_eval, which fails on JSON's true, false and null."""
    if code_scoring not in ("fixed", "reference"):
        raise ValueError(f"unknown code_scoring {code_scoring!r}")
    fail = Score(-1.0, False, None)
    reference = code_scoring == "reference"
    if "</think>" in solution_str:
        solution_str = (solution_str.split("</think>")[1] if reference
                        else solution_str.rsplit("</think>", 1)[1])
    blocks = re.findall(r"```python\n(.*?)```", solution_str, re.DOTALL)
    if not blocks:
        return fail
    code = blocks[-1]
    if reference:
        code = code.replace("\\n", "\n").replace("\\t", "\t")
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError, RecursionError):  # ValueError: a null byte
        return fail
    as_text = str(tests)  # the authors' compute_score works on the tests' str()
    tests = check_code_tests(tests)
    if reference:
        code, failed = _reference_reading(code, as_text, tests)
        if failed:
            return failed
        tree = ast.parse(code)
    passed = code_verdicts(code, tree, tests, timeout=timeout)
    if not passed:
        return fail
    if reference and "import_prefix" in tests:
        code = tests["import_prefix"] + code  # their pred carries the prefix
    return Score(sum(passed) / len(passed), all(passed), code)


def _reference_reading(code: str, as_text: str, tests: dict) -> tuple[str | None, Score | None]:
    """What the authors' compute_score does to the code and the tests' text before it runs anything:
    (the code it runs, or the score it gives without running)."""
    json_text = _is_json(as_text)
    if "import_prefix" in tests:
        # json.loads fails and its fallback gives the str back, which "import_prefix" cannot index
        return code, None if json_text else Score(-1.0, False, None)
    if not json_text:  # input_output stays a str: "fn_name" is a substring test, then a failed index
        if "fn_name" in as_text and "class Solution" not in code:
            return code, Score(-1.0, False, code)
    elif "fn_name" in tests and "class Solution" not in code:
        code = as_class_method(code, tests["fn_name"])
        if code is None:
            return code, Score(-1.0, False, None)
    try:  # check_correctness reads the tests' text with ast.literal_eval
        ast.literal_eval(as_text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return code, Score(-1.0, False, code)
    return code, None


def code_verdicts(code: str, tree, tests: dict, *, timeout: float = CODE_TEST_TIMEOUT) -> list[bool] | None:
    """Pass or fail for each test case, the cases run in parallel; None if the code cannot be tested."""
    cases = _code_cases(code, tree, tests)
    if not cases:
        return None

    def run(case):
        return sandbox.run_python(case[0], case[1], timeout, CODE_TEST_MEMORY_MB)

    with ThreadPoolExecutor(min(len(cases), MAX_PARALLEL_CASES)) as pool:
        results = list(pool.map(run, cases))
    return [passes(result) for (_, _, passes), result in zip(cases, results)]
