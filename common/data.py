"""
common/data.py: data files and the authors' prompt wrappers.

`load_rows` reads a .jsonl / .json / .parquet file; `wrap_prompt` turns one row into the user prompt the
authors' reward module builds for it (recipe/demystify/reward.py), byte for byte; `load_prompts` gives the
RL and evaluation prompts of a file or of the toy task; `drop_long_prompts` is the authors'
filter_overlong_prompts. The toy generator itself lives in toy/task.py.
"""
import json
import logging
from collections import Counter
from pathlib import Path

from common.code_tests import check_code_tests

log = logging.getLogger("data")

MATH1 = "Analyze and solve the following math problem step by step. \n\n"
MATH2 = ("\n\nThe tool could be used for more precise and efficient calculation and could help you to verify "
         "your result before you reach the final answer.")
AGENT = ("\n\n**Note: You should first analyze the problem and form a high-level solution strategy, then "
         "utilize the tools to help you solve the problem.**")
ANSFMT = ("\nRemember once you make sure the current answer is your final answer, do not call the tools "
          "again and directly output the final answer in the following text format, the answer format must "
          "be: \\boxed{'The final answer goes here.'}.")
NOUNITS_A = ("\nDo not put units of the final answer inside \\boxed{}. The content of \\boxed{} should be "
             "the numerical value of the final answer only, without any units.")
NOUNITS_B = ("\nDo not put units of the final answer inside \\boxed{}. The content of \\boxed{} should be "
             "the final numerical value of the final answer only, without any units.")
CODE_SUFFIX = ("\nBefore sumbit your code, you can utilize tools to check the correctness of your code, once "
               "you make sure the current code is correct, do not call the tools again and submit your code "
               "within ```python\n# YOUR CODE HERE\n```.")
LCB_START = ("You will be given a question (problem specification) and will generate a correct Python "
             "program that matches the specification and passes all tests.\n\n")
LCB_CODEP = ("\n\nRead the inputs from stdin solve the problem and write the answer to stdout "
             "(do not directly test on the sample inputs). Enclose your code within delimiters as follows. "
             "Ensure that when the python program runs, it reads the inputs, runs the algorithm and writes "
             "output to STDOUT.\n```python\n# YOUR CODE HERE\n\"")


def _maybe_json(x):
    return json.loads(x) if isinstance(x, str) and x[:1] in "{[" else x


def wrap_prompt(row: dict) -> tuple[str, str, object]:
    """One data row -> (user prompt text, data_source, ground truth), wrapped as the reference does.

    The wrapper follows the row's data_source, as recipe/demystify/reward.py chooses it (per row here, not
    from the file's first row: docs/deviations.md); the columns decide only where data_source is missing.
    Layouts: the RL schema (prompt / data_source / reward_model), AIME (Problem/Answer or problem/answer),
    GPQA (problem/solution/domain), LiveCodeBench (problem + reward_model as a JSON string).
    """
    source = str(row.get("data_source") or "")
    reward_model = _maybe_json(row.get("reward_model")) or {}
    if "prompt" in row:  # RL schema: a chat list with one user message
        prompt = _maybe_json(row["prompt"])
        stored = prompt[-1]["content"] if isinstance(prompt, list) else str(prompt)
        truth = reward_model.get("ground_truth")
        if source.startswith("toy"):
            return stored, source, truth
        if source in ("math_dapo", "mega-science"):
            return stored + NOUNITS_A, source, truth
        if "code" in source:
            return stored + AGENT + CODE_SUFFIX, source, truth
        return MATH1 + stored + MATH2 + AGENT + ANSFMT + NOUNITS_B, source, truth
    columns = set(row)
    if source in ("AIME2024", "AIME2025") or (not source and ({"Problem", "Answer"} <= columns or
                                                               {"problem", "answer"} <= columns)):
        problem, answer = ((row["Problem"], row["Answer"]) if "Problem" in row
                           else (row["problem"], row["answer"]))
        return MATH1 + problem + MATH2 + AGENT + ANSFMT, source or "AIME", str(answer)
    if source == "gpqa_diamond" or (not source and {"problem", "solution", "domain"} <= columns):
        text = (f"Analyze and solve the following {row['domain']} problem step by step. \n\n" + row["problem"]
                + MATH2 + AGENT + ANSFMT
                + "\n Here you need to put the final uppercase letter option of this problem into \\boxed{}")
        return text, source or "gpqa_diamond", str(row["solution"])
    if source == "LiveCodeBench_v6" or (not source and "problem" in row and reward_model):
        # the "examples" are the scoring tests, as in the authors' prompt (docs/deviations.md)
        truth = _maybe_json(reward_model["ground_truth"])
        examples = ("\nHere are some input and output examples of the expected code:\nInput:"
                    + str(truth["inputs"]) + "\nOutput:\n" + str(truth["outputs"]))
        return (LCB_START + row["problem"] + examples + AGENT + LCB_CODEP + CODE_SUFFIX,
                source or "LiveCodeBench_v6", truth)
    raise ValueError(f"data_source {source!r} with columns {sorted(row)} matches no prompt wrapper; "
                     "expected one of: [prompt, data_source, reward_model] (RL), "
                     "AIME2024/AIME2025 [Problem, Answer] or [problem, answer], "
                     "gpqa_diamond [problem, solution, domain], LiveCodeBench_v6 [problem, reward_model]")


def load_rows(path: str) -> list[dict]:
    """Read a .jsonl / .json / .parquet file into a list of dicts; a file that cannot be read stops the run
    with its name and the reason."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"data file not found: {path}")
    if p.stat().st_size == 0:
        raise SystemExit(f"{path}: the file is empty (0 bytes)")
    if p.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("reading parquet needs pandas and pyarrow: pip install pandas pyarrow") from e
        try:
            frame = pd.read_parquet(p)
        except Exception as e:  # pyarrow's errors name neither the file nor the problem in plain words
            raise SystemExit(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        return [_to_plain(r) for r in frame.to_dict(orient="records")]
    if p.suffix == ".json":
        try:
            rows = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise SystemExit(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise SystemExit(f"{path}: expected a JSON list of rows, got a {type(rows).__name__}")
        return rows
    rows = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{i}: not valid JSON ({e})") from None
    return rows


def _to_plain(x):
    """parquet gives numpy arrays for lists; turn nested values back into lists and dicts."""
    if hasattr(x, "tolist"):
        x = x.tolist()
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_plain(v) for v in x]
    return x


KNOWN_SOURCES = {"toy_arith", "math_dapo", "mega-science", "AIME2024", "AIME2025",
                 "gpqa_diamond"}  # plus any "code"


def toy_steps_range(text: str) -> tuple[int, int]:
    """"2-4" -> (2, 4): how many dependent tool calls a toy problem needs."""
    try:
        low, high = (int(x) for x in text.split("-"))
        assert 1 <= low <= high <= 8
    except (ValueError, AssertionError):
        raise SystemExit("--toy_steps must be like 2-4 (from 1 to 8 dependent calls), "
                         f"not {text!r}") from None
    return low, high


def load_prompts(path: str, n: int | None = None, seed: int = 0, toy_steps: str = "2-4") -> list[dict]:
    """RL / eval prompts as {"prompt", "data_source", "ground_truth", "hint", "id"}; "toy[:split]" builds a
    toy split (train, eval, valid) of problems needing `toy_steps` dependent calls. Malformed rows are skipped
    and counted; rows of a data_source no grader knows are counted and graded as math."""
    if path.startswith("toy"):
        from toy import task
        split = path.split(":")[1] if ":" in path else "train"
        rows = task.rl_rows(n or 256, split=split, seed=seed, steps=toy_steps_range(toy_steps))
    else:
        rows = load_rows(path)
    out, bad, unknown = [], Counter(), Counter()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"a row must be an object, not a {type(row).__name__}")
            text, source, truth = wrap_prompt(row)
            if truth is None:
                raise ValueError("no ground truth")
            if "code" in source.lower():
                check_code_tests(truth)
        except (ValueError, KeyError, TypeError) as e:
            bad[str(e)[:400]] += 1
            if sum(bad.values()) == 1:
                log.warning("%s row %d skipped: %s", path, i, e)
            continue
        if source not in KNOWN_SOURCES and "code" not in source.lower():
            unknown[source] += 1
        out.append({"prompt": text, "data_source": source, "ground_truth": truth, "hint": row.get("hint"),
                    "id": row.get("id", i)})
    if bad:
        log.warning("%s: skipped %d malformed rows (%s)", path, sum(bad.values()), dict(bad))
    if unknown:
        log.warning("%s: %d rows have a data_source without a grader of its own (%s): graded as math with "
                    "the strict box, as the authors' reward does for every source without 'code'",
                    path, sum(unknown.values()), dict(unknown))
    if not out:
        raise SystemExit(f"{path}: no usable rows"
                         + (f"; the first problem: {next(iter(bad))}" if bad else ""))
    return out[:n] if n else out


def drop_long_prompts(prompts: list[dict], tokenizer, max_tokens: int, name: str = "") -> list[dict]:
    """The reference's filter_overlong_prompts: the user turn rendered by the chat template with the
    generation prompt, *without* the tools block, must fit in max_tokens."""
    def length(p):
        text = tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))
    kept = [p for p in prompts if length(p) <= max_tokens]
    if len(kept) < len(prompts):
        log.info("%sdropped %d of %d prompts longer than %d tokens", f"{name}: " if name else "",
                 len(prompts) - len(kept), len(prompts), max_tokens)
    return kept


def write_jsonl(path, records: list[dict]):
    """Append records to a JSONL log, one line each."""
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r, default=str) + "\n")

