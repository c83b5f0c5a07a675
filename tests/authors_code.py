"""
tests/authors_code.py: the authors' code grader and step weights, re-typed for the tests (and scripts/speed.py)
to compare ours against.

Written out by hand, branch for branch, from github.com/YoungZ365/SOD (not copied):
verl/utils/reward_score/livecodebench/code_math.py (compute_score, convert_function_to_class_method) and
verl/utils/reward_score/sandbox_fusion/utils.py (check_correctness, _process_single_case). The one change: a
test case runs in the local sandbox (common/sandbox.py) instead of a SandboxFusion server, and a run counts as
their API's "Success" when it finishes with exit code 0.
"""
import ast
import json
import re

import torch

from common import sandbox

FAIL = {"score": -1.0, "acc": False, "pred": None}


def convert_function_to_class_method(raw_code: str, function_name: str) -> str | None:
    """code_math.convert_function_to_class_method, re-typed apart from common/code_tests.py: every top-level
    `def function_name` leaves the module, the last of them becomes the one method of a class Solution put at
    the end, `self` first among its parameters (unless it is there already), and the module is written back by
    ast.unparse. An `async def` is not a FunctionDef there, so it stays where it is. None without such a
    function."""
    module = ast.parse(raw_code)
    def is_target(node):
        return type(node) is ast.FunctionDef and node.name == function_name
    targets = [node for node in module.body if is_target(node)]
    if not targets:
        return None
    method = targets[-1]
    first = method.args.args[0].arg if method.args.args else None
    if first != "self":
        method.args.args = [ast.arg(arg="self", annotation=None)] + method.args.args
    module.body = [node for node in module.body if not is_target(node)]
    module.body.append(ast.ClassDef(name="Solution", bases=[], keywords=[], body=[method], decorator_list=[]))
    return ast.unparse(module)


def authors_wrapper(generation: str, fn_name: str) -> str:
    """The program _process_single_case sends for a test of a function: `import traceback`, eighteen star
    imports and sixteen plain ones, the solution, then a harness that reads one JSON value per line of stdin
    (when stdin is not blank), calls globals()[fn_name] or else Solution().fn_name, and prints json.dumps of a
    dict, list, tuple, None or bool and str() of anything else; an error prints its traceback to stderr and
    nothing to stdout."""
    stars = ["string", "re", "datetime", "collections", "heapq", "bisect", "copy", "math", "random",
             "statistics", "itertools", "functools", "operator", "io", "sys", "json", "builtins", "typing"]
    plain = [m for m in stars if m not in ("builtins", "typing")]
    header = ("import traceback\n" + "".join(f"from {m} import *\n" for m in stars)
              + "".join(f"import {m}\n" for m in plain))
    harness = f'''
WANTED = {fn_name!r}
def call_it():
    raw = sys.stdin.read()
    args = []
    if raw.strip():
        try:
            args = [json.loads(line) for line in raw.split('\\n')]
        except json.JSONDecodeError as error:
            sys.stderr.write("bad input")
            return None, True
    try:
        if WANTED in globals():
            target = globals()[WANTED]
        elif 'Solution' in globals():
            target = getattr(Solution(), WANTED)
        else:
            raise NameError(WANTED)
        return target(*args), False
    except Exception:
        sys.stderr.write(traceback.format_exc())
        return None, True
result, failed = call_it()
if not failed:
    if isinstance(result, (dict, list, tuple)) or result is None or isinstance(result, bool):
        print(json.dumps(result))
    else:
        print(str(result))
'''
    return header + "\n" + generation + "\n" + harness


def authors_verdicts(generation: str, tests: dict) -> list[bool]:
    """Their comparison for a function problem's cases: the run finished with exit code 0 and
    stdout.rstrip("\\n") == str(expected).rstrip("\\n")."""
    verdicts = []
    for inp, expected in zip(tests["inputs"], tests["outputs"]):
        r = sandbox.run_python(authors_wrapper(generation, tests["fn_name"]), str(inp), timeout=10)
        verdicts.append(r.status == "finished" and r.returncode == 0
                        and r.stdout.rstrip("\n") == str(expected).rstrip("\n"))
    return verdicts


def authors_check_correctness(in_outs, generation: str, timeout: float = 10) -> list:
    """check_correctness: True / False per case, or their negative error codes (-1 for a malformed spec,
    -2 for a run that did not finish cleanly)."""
    if not in_outs or "inputs" not in in_outs or "outputs" not in in_outs:
        return [-1]
    if type(in_outs) is str:
        in_outs = ast.literal_eval(json.loads(json.dumps(in_outs)))
    inputs = ast.literal_eval(in_outs["inputs"]) if type(in_outs["inputs"]) is str else in_outs["inputs"]
    outputs = ast.literal_eval(in_outs["outputs"]) if type(in_outs["outputs"]) is str else in_outs["outputs"]
    fn_name = in_outs.get("fn_name")
    assert_cases = in_outs.get("assert_case", [""] * len(inputs))
    if len(inputs) == 0:
        return []
    if len(inputs) != len(outputs) or len(assert_cases) != len(inputs):
        return [-1] * len(inputs)
    results = []
    for stdin, expected, case in zip(inputs, outputs, assert_cases):
        program = (generation + "\n\n" + str(case)) if case else generation
        if fn_name:
            program = authors_wrapper(program, fn_name)
        r = sandbox.run_python(program, "" if stdin is None else str(stdin), timeout)
        if r.status != "finished" or r.returncode != 0:
            results.append(-2)
        else:
            results.append(expected is None or r.stdout.rstrip("\n") == str(expected).rstrip("\n"))
    return results


def authors_compute_score(completion: str, test_cases, timeout: float = 10) -> dict:
    """code_math.compute_score with its defaults (partial credit)."""
    solution_str = completion.split("</think>")[1] if "</think>" in completion else completion
    test_cases = str(test_cases)
    if "import_prefix" in test_cases:
        solutions = re.findall(r"```python\n(.*?)```", solution_str, re.DOTALL)
        if len(solutions) == 0:
            return dict(FAIL)
        try:
            solution = solutions[-1].replace("\\n", "\n").replace("\\t", "\t")
            ast.parse(solution)
            try:
                test_cases = json.loads(test_cases)
            except Exception:
                test_cases = json.loads(json.dumps(test_cases))
            solution = test_cases["import_prefix"] + solution
            test_code = [x for x in test_cases["test_code"].split("\n") if x != ""]
            results = []
            for i in range(1, len(test_code)):
                program = (solution + "\n" + test_code[0] + test_code[i]
                           + "\ncheck({})".format(test_cases["entry_point"]))
                r = sandbox.run_python(program, "prefix", timeout)
                results.append(r.status == "finished" and r.returncode == 0)
            return {"score": sum(results) / len(results), "acc": all(results), "pred": solution}
        except Exception:
            return dict(FAIL)
    if "inputs" in test_cases:
        try:
            solutions = re.findall(r"```python\n(.*?)```", solution_str, re.DOTALL)
            if len(solutions) == 0:
                return dict(FAIL)
            solution = solutions[-1]
            try:
                solution = solution.replace("\\n", "\n").replace("\\t", "\t")
                ast.parse(solution)
            except Exception:
                return dict(FAIL)
            try:
                input_output = json.loads(test_cases)
            except Exception:
                input_output = json.loads(json.dumps(test_cases))
            if "fn_name" in input_output and "class Solution" not in solution:
                solution = convert_function_to_class_method(solution, input_output["fn_name"])
                if not isinstance(solution, str):
                    return dict(FAIL)
            verdicts = authors_check_correctness(json.loads(json.dumps(test_cases)), solution, timeout)
            return {"score": sum((x if x in [False, True] else False) for x in verdicts) / len(verdicts),
                    "acc": sum(verdicts) == len(verdicts), "pred": solution}
        except Exception:
            return {"score": -1.0, "acc": False, "pred": solution}
    raise NotImplementedError("their math branch is not re-typed here")


# -----------------------------------------------------------------------------
# The step weights (verl/trainer/ppo/ray_trainer.py: _extract_step_boundaries, compute_stepwise_opd_weights)

def retyped_step_boundaries(response_mask):
    """_extract_step_boundaries, re-typed: each row scanned token by token with .item()."""
    batch_boundaries = []
    bsz, seq_len = response_mask.shape
    for i in range(bsz):
        mask_i = response_mask[i]
        boundaries, in_segment, seg_start = [], False, 0
        for t in range(seq_len):
            if mask_i[t].item() == 1 and not in_segment:
                seg_start, in_segment = t, True
            elif mask_i[t].item() == 0 and in_segment:
                boundaries.append((seg_start, t))
                in_segment = False
        if in_segment:
            boundaries.append((seg_start, seq_len))
        batch_boundaries.append(boundaries)
    return batch_boundaries


def retyped_step_weights(old_log_probs, ref_log_prob, response_mask, epsilon=1e-6, delta=0.5):
    """compute_stepwise_opd_weights, re-typed: d_k per step from .item() sums, a running product of ratios
    clipped when each step's weight is written, the per-sample log built as theirs is."""
    bsz, seq_len = response_mask.shape
    abs_logprob_diff = (old_log_probs - ref_log_prob).abs()
    batch_boundaries = retyped_step_boundaries(response_mask)
    weight_mask = torch.zeros_like(response_mask, dtype=torch.float32)
    log_info = []
    for i in range(bsz):
        boundaries = batch_boundaries[i]
        if len(boundaries) == 0:
            log_info.append({"n_steps": 0, "d_values": [], "w_values": [], "n_tokens_per_step": [],
                             "boundaries": []})
            continue
        d_values, n_tokens_per_step = [], []
        for start, end in boundaries:
            step_diff = abs_logprob_diff[i, start:end]
            step_mask = response_mask[i, start:end]
            n_tokens = step_mask.sum().item()
            d_values.append((step_diff * step_mask).sum().item() / n_tokens if n_tokens > 0 else 0.0)
            n_tokens_per_step.append(int(n_tokens))
        K = len(d_values)
        w_values = [1.0]
        if K > 1:
            cum_prod = 1.0
            for u in range(K - 1):
                cum_prod *= (d_values[u] + epsilon) / (d_values[u + 1] + epsilon)
                w_values.append(min(cum_prod, 1.0 + delta))
        for k, (start, end) in enumerate(boundaries):
            weight_mask[i, start:end] = w_values[k]
        log_info.append({"n_steps": K, "d_values": d_values, "w_values": w_values,
                         "n_tokens_per_step": n_tokens_per_step, "boundaries": list(boundaries)})
    return weight_mask, log_info
