"""
The code grader (common/code_tests.py) against the authors' (tests/authors_code.py): every form of tests their
grader reads is loaded, --code_scoring reference gives their verdicts, and the fixed grader calls a function
where it stands.

    python -m pytest tests/test_code_tests.py -q
"""
import json

import pytest

from authors_code import authors_compute_score, convert_function_to_class_method
from common import code_tests, data

DOUBLE = "n = int(input())\nprint(n * 2)\n"
WRONG_AT_3 = "n = int(input())\nprint(n * 2 + (n == 3))\n"
FIB = "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
FIB_METHOD = ("class Solution:\n    def fib(self, n):\n"
              "        return n if n < 2 else self.fib(n - 1) + self.fib(n - 2)\n")
ADD = "def add(a, b):\n    # a comment that ast.unparse drops\n    return a + b\n"
POSITIVE = "def pos(a):\n    return a > 0\n"

STDIN = {"inputs": ["1\n", "2\n", "3\n"], "outputs": ["2\n", "4\n", "6\n"]}
FIB_TESTS = {"inputs": ["5", "10"], "outputs": ["5", "55"], "fn_name": "fib"}
ADD_TESTS = {"inputs": ["1\n2", "2\n2"], "outputs": ["3", "5"], "fn_name": "add"}
LEETCODE = {"import_prefix": "from typing import *\n", "entry_point": "add",
            "test_code": ("def check(candidate):\n    assert candidate(1, 2) == 3\n"
                          "    assert candidate(2, 2) == 5\n")}


def answer(code):
    return f"I tested it.\n```python\n{code}```"


def literal_strings(tests):
    """inputs and outputs as strings holding Python lists, the form check_correctness reads with literal_eval."""
    return {**tests, "inputs": str(tests["inputs"]), "outputs": str(tests["outputs"])}


def test_a_livecodebench_row_with_literal_eval_tests_is_loaded_and_graded_as_the_authors_grade_it(tmp_path):
    truth = literal_strings(STDIN)
    row = {"problem": "Print twice n.", "data_source": "LiveCodeBench_v6", "ability": "code",
           "reward_model": json.dumps({"ground_truth": truth}), "extra_info": "{}"}
    path = tmp_path / "lcb.jsonl"
    path.write_text(json.dumps(row) + "\n")
    (p,) = data.load_prompts(str(path))
    (message,) = p.prompt
    # map_lcb shows str() of the stored tests: the strings themselves
    assert ("Input:" + truth["inputs"] + "\nOutput:\n" + truth["outputs"]) in message["content"]
    for code in (DOUBLE, WRONG_AT_3, "print(int(input())\n"):
        theirs = authors_compute_score(answer(code), p.ground_truth)
        for mode in ("fixed", "reference"):
            assert code_tests.score_code(answer(code), p.ground_truth, code_scoring=mode)._asdict() == theirs
    assert code_tests.score_code(answer(WRONG_AT_3), p.ground_truth).score == pytest.approx(2 / 3)


FORMS = [("a dict of lists", STDIN), ("a JSON string", json.dumps(STDIN)), ("a Python literal", str(STDIN)),
         ("lists as literal strings", literal_strings(STDIN)),
         ("a JSON string of literal strings", json.dumps(literal_strings(STDIN)))]


@pytest.mark.parametrize("name, tests", FORMS, ids=[name for name, _ in FORMS])
def test_every_form_of_tests_the_authors_grader_reads_is_kept_and_graded(name, tests):
    assert code_tests.check_code_tests(tests)["inputs"] == STDIN["inputs"]
    assert code_tests.score_code(answer(WRONG_AT_3), tests).score == pytest.approx(2 / 3)


def test_code_rows_without_usable_tests_are_dropped_with_the_reason_counted(tmp_path, caplog):
    def row(truth):
        return {"prompt": [{"role": "user", "content": "P"}], "data_source": "skywork_code",
                "reward_model": {"ground_truth": truth}}
    rows = [row(literal_strings(STDIN)), row({"inputs": [], "outputs": []}),
            row({"inputs": ["1"], "outputs": ["1", "2"]}), row({"inputs": ["1"], "outputs": ["1"]}),
            row("not tests at all"), row({"inputs": "1 2", "outputs": ["3"]})]
    path = tmp_path / "code.jsonl"
    path.write_text("\n".join(map(json.dumps, rows)))
    assert len(data.load_prompts(str(path))) == 2
    assert "skipped 4 malformed rows" in caplog.text
    for reason in ("no test cases", "differ in length", "neither JSON nor a Python literal",
                   "`inputs` is a string that is not a Python literal"):
        assert f"1 x code tests{'' if reason.startswith('neither') else ':'}" in caplog.text
        assert reason in caplog.text


def test_assert_cases_are_appended_to_the_solution_of_their_own_test():
    tests = {"inputs": ["", ""], "outputs": ["", ""],
             "assert_case": ["assert add(1, 2) == 3", "assert add(2, 2) == 5"]}
    result = code_tests.score_code(answer(ADD), tests)
    assert result.score == 0.5 and result._asdict() == authors_compute_score(answer(ADD), tests)


# (answer, tests): the reference mode against the authors' compute_score, score, acc and pred
CASES = {
    "stdin, a dict": (DOUBLE, STDIN),
    "stdin, a Python literal, one case wrong": (WRONG_AT_3, str(STDIN)),
    "recursive function, JSON text: moved into class Solution, then NameError": (FIB, json.dumps(FIB_TESTS)),
    "recursive function, a dict: str(dict) cannot be indexed by 'fn_name'": (FIB, FIB_TESTS),
    "recursive method of class Solution, a dict": (FIB_METHOD, FIB_TESTS),
    "recursive method, literal strings as JSON text": (FIB_METHOD, json.dumps(literal_strings(FIB_TESTS))),
    "plain function, JSON text: the wrapping keeps it working": (ADD, json.dumps(ADD_TESTS)),
    "no function of that name": ("def other(a, b):\n    return 0\n", json.dumps(ADD_TESTS)),
    "JSON true: ast.literal_eval fails": (POSITIVE, json.dumps({"inputs": ["3"], "outputs": [True],
                                                                "fn_name": "pos"})),
    "LeetCode asserts, JSON text": (ADD, json.dumps(LEETCODE)),
    "LeetCode asserts, a dict": (ADD, LEETCODE),
    "an escaped newline, unescaped into a syntax error": ("print('\\n'.join(['a']))\n",
                                                          {"inputs": [""], "outputs": ["a"]}),
}


@pytest.mark.parametrize("code, tests", CASES.values(), ids=CASES.keys())
def test_reference_code_scoring_gives_the_authors_verdicts(code, tests):
    ours = code_tests.score_code(answer(code), tests, code_scoring="reference")
    assert ours._asdict() == authors_compute_score(answer(code), tests)


def test_the_fixed_grader_calls_a_recursive_function_where_it_stands():
    for tests in (FIB_TESTS, json.dumps(FIB_TESTS), str(FIB_TESTS)):
        assert code_tests.score_code(answer(FIB), tests) == code_tests.Score(1.0, True, FIB)
    wrapped = code_tests.score_code(answer(FIB), json.dumps(FIB_TESTS), code_scoring="reference")
    assert wrapped.score == 0.0 and wrapped.pred == code_tests.as_class_method(FIB, "fib")
    assert "class Solution" in wrapped.pred and "def fib(self, n)" in wrapped.pred


WRAPPING = {
    "a recursive function": FIB,
    "self already first": "def add(self, a, b):\n    return a + b\n",
    "two definitions, the last kept": "def add(a, b):\n    return 0\n\ndef add(a, b):\n    return a + b\n",
    "code around it, a comment dropped": ("import math\nK = 2  # two\ndef add(a, b):\n    return a + b\n"
                                          "print(add(1, 2))\n"),
    "an async def is left alone": "async def add(a, b):\n    return a + b\n",
    "a method of another class is not top-level": "class A:\n    def add(self, a, b):\n        return 1\n",
    "keyword-only and defaults": "def add(a, b=1, *args, c, **kw):\n    return a + b\n",
}


@pytest.mark.parametrize("code", WRAPPING.values(), ids=WRAPPING.keys())
def test_class_wrapping_is_the_authors(code):
    fn = "fib" if "fib" in code else "add"
    assert code_tests.as_class_method(code, fn) == convert_function_to_class_method(code, fn)
