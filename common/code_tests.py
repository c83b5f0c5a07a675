"""
common/code_tests.py: the grader of code answers, unit tests with partial credit, as the authors' sandbox
wrapper grades them (verl/utils/reward_score/sandbox_fusion/utils.py, livecodebench/code_math.py).

score_code gives the fraction of a problem's tests that the last ```python block of an answer passes;
code_verdicts, pass or fail per test case; check_code_tests, a problem's ground truth read and checked. The
cases run in parallel in the sandbox (common/sandbox.py) as it is configured.
"""
import ast
import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


def check_code_tests(tests) -> dict:
    """A code problem's ground truth as a dict, or ValueError saying what is wrong with it: {"inputs",
    "outputs"} (stdin/stdout), the same with "fn_name" (a function's arguments and return value), or
    {"import_prefix", "test_code", "entry_point"} (LeetCode asserts); a JSON string of one of these is read
    first."""
    if isinstance(tests, str):
        try:
            tests = json.loads(tests)
        except json.JSONDecodeError as e:
            raise ValueError(f"code tests are a string that is not JSON ({e.msg})") from None
    if not isinstance(tests, dict):
        raise ValueError(f"code tests must be an object, not a {type(tests).__name__}")
    if {"import_prefix", "test_code", "entry_point"} <= tests.keys():
        return tests
    inputs, outputs = tests.get("inputs"), tests.get("outputs")
    if (not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs)
            or not inputs):
        raise ValueError("code tests need equally long, non-empty `inputs` and `outputs` lists "
                         "(or import_prefix, test_code and entry_point)")
    return tests


def _exited_cleanly(result):
    return result["status"] == "finished" and result["returncode"] == 0


def _printed(expected):
    return lambda r: _exited_cleanly(r) and r["stdout"].rstrip("\n") == str(expected).rstrip("\n")


def _code_cases(code: str, tree, tests: dict):
    """[(program, stdin, passed(result))] for one test spec, or None if the code cannot be tested."""
    if "import_prefix" in tests:
        # LeetCode style, as the reference builds it: check()'s header line glued to each
        # later non-empty line ("def check(candidate):" + "    assert ..." is valid python)
        lines = [line for line in tests["test_code"].split("\n") if line != ""]
        return [(tests["import_prefix"] + code + "\n" + lines[0] + lines[i]
                 + f"\ncheck({tests['entry_point']})", "", _exited_cleanly) for i in range(1, len(lines))]
    if "fn_name" in tests:
        fn = tests["fn_name"]
        defines = {node.name for node in tree.body if isinstance(node, (ast.ClassDef, ast.FunctionDef))}
        if "Solution" not in defines and fn not in defines:
            return None  # the reference cannot wrap a missing function into class Solution
        program = _FUNCTION_PREAMBLE + code + _FUNCTION_HARNESS.replace("FN_NAME", repr(fn))
        return [(program, str(inp), _printed(out)) for inp, out in zip(tests["inputs"], tests["outputs"])]
    return [(code, str(inp), _printed(out)) for inp, out in zip(tests["inputs"], tests["outputs"])]


def score_code(solution_str: str, tests, *, code_scoring: str = "fixed",
               timeout: float = CODE_TEST_TIMEOUT) -> dict:
    """The fraction of unit tests the last ```python block passes
    (verl/utils/reward_score/livecodebench/code_math.py).

    code_scoring="fixed" reads the text after the last </think>; "reference" keeps the authors' behaviour:
    split("</think>")[1] (the text between the first two), every "\\n" escape turned into a line break (which
    breaks print("\\n".join(...))), and a function problem whose tests come as an object (not a JSON string)
    scored -1 unless the code defines class Solution (their str() / json.loads round trip of the tests)."""
    if code_scoring not in ("fixed", "reference"):
        raise ValueError(f"unknown code_scoring {code_scoring!r}")
    fail = {"score": -1.0, "acc": False, "pred": None}
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
    as_object = isinstance(tests, dict)
    tests = check_code_tests(tests)
    if reference and as_object and "fn_name" in tests and "class Solution" not in code:
        return {"score": -1.0, "acc": False, "pred": code}
    passed = code_verdicts(code, tree, tests, timeout=timeout)
    if not passed:
        return fail
    return {"score": sum(passed) / len(passed), "acc": all(passed), "pred": code}


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
