"""
common/data.py: data files and the authors' prompt wrappers.

`load_rows` reads a .jsonl / .json / .parquet file; `wrap_prompt` turns one row into the chat messages the
authors' dataset builds for it (recipe/demystify/reward.py: CustomRLHFDataset), byte for byte; `load_prompts`
gives the RL and evaluation prompts of a file (or of rows the toy task generated); `drop_long_prompts` is the
authors' filter_overlong_prompts. A prompt is a list of chat messages (the row's own list, with the wrapper's
text in its user message), rendered with the tool declared by rollout.render_prompt_ids. The toy generator
itself lives in toy/task.py (rollout.load_prompts chooses between the two). `check_conversation` says what is
wrong with an SFT row, in words.
"""
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from common.code_tests import check_code_tests, read_code_tests

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


def as_messages(prompt) -> list[dict]:
    """A prompt as chat messages: a plain string is one user message."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def with_user_text(messages: list[dict], edit) -> list[dict]:
    """A copy of the messages whose first user message reads edit(its content): where the wrappers, and the
    opsd teachers' privileged text, go."""
    out = [dict(m) for m in messages]
    for m in out:
        if m.get("role") == "user":
            m["content"] = edit(m["content"])
            return out
    raise ValueError("the prompt has no user message")


def wrapper_for(row: dict) -> str:
    """Which of the authors' map functions (recipe/demystify/reward.py) wraps a row, by its data_source (by its
    columns only where it has none): toy (none), units (map_fn2), skywork (map_fn_skywork), aime (map_fn),
    gpqa (map_fn_gpqa) or lcb (map_lcb)."""
    source = str(row.get("data_source") or "")
    columns = set(row)
    if "prompt" in row:  # the RL schema
        if source.startswith("toy"):
            return "toy"
        return "units" if source in ("math_dapo", "mega-science") else "skywork"
    if source in ("AIME2024", "AIME2025") or (not source and ({"Problem", "Answer"} <= columns or
                                                               {"problem", "answer"} <= columns)):
        return "aime"
    if source == "gpqa_diamond" or (not source and {"problem", "solution", "domain"} <= columns):
        return "gpqa"
    if source == "LiveCodeBench_v6" or (not source and "problem" in row and row.get("reward_model")):
        return "lcb"
    raise ValueError(f"data_source {source!r} with columns {sorted(row)} matches no prompt wrapper; "
                     "expected one of: [prompt, data_source, reward_model] (RL), "
                     "AIME2024/AIME2025 [Problem, Answer] or [problem, answer], "
                     "gpqa_diamond [problem, solution, domain], LiveCodeBench_v6 [problem, reward_model]")


def wrap_prompt(row: dict, wrapper: str | None = None) -> tuple[list[dict], str, object]:
    """One data row -> (chat messages, data_source, ground truth), wrapped as the authors' dataset wraps it.

    `wrapper` (a name of wrapper_for) defaults to the row's own; the authors take the one of a file's first
    row for every row (docs/deviations.md row 8, --wrapper_choice file). A row in the RL schema keeps its whole
    message list, the wrapper's text going into its user message; the evaluation layouts (AIME: Problem/Answer
    or problem/answer; GPQA: problem/solution/domain; LiveCodeBench: problem + reward_model as a JSON string)
    become one user message, as in the authors' map functions.
    """
    wrapper = wrapper or wrapper_for(row)
    source = str(row.get("data_source") or "")
    reward_model = _maybe_json(row.get("reward_model")) or {}
    if wrapper in ("toy", "units", "skywork"):
        if "prompt" not in row:
            raise ValueError(f"the {wrapper} wrapper reads a `prompt` column, and this row has none")
        messages = as_messages(_maybe_json(row["prompt"]))
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise ValueError("`prompt` must be a string or a list of chat messages")
        truth = reward_model.get("ground_truth")
        if wrapper == "toy":
            return [dict(m) for m in messages], source, truth
        if wrapper == "units":
            return with_user_text(messages, lambda text: text + NOUNITS_A), source, truth
        if "code" in source:
            return with_user_text(messages, lambda text: text + AGENT + CODE_SUFFIX), source, truth
        return (with_user_text(messages, lambda text: MATH1 + text + MATH2 + AGENT + ANSFMT + NOUNITS_B),
                source, truth)
    if wrapper == "aime":
        problem, answer = ((row["Problem"], row["Answer"]) if "Problem" in row
                           else (row["problem"], row["answer"]))
        return as_messages(MATH1 + problem + MATH2 + AGENT + ANSFMT), source or "AIME", str(answer)
    if wrapper == "gpqa":
        text = (f"Analyze and solve the following {row['domain']} problem step by step. \n\n" + row["problem"]
                + MATH2 + AGENT + ANSFMT
                + "\n Here you need to put the final uppercase letter option of this problem into \\boxed{}")
        return as_messages(text), source or "gpqa_diamond", str(row["solution"])
    if wrapper == "lcb":
        # the "examples" are the scoring tests, as in the authors' prompt (docs/deviations.md row 7); str() of
        # tests stored as a string of a list shows that string, as theirs does
        truth = read_code_tests(reward_model["ground_truth"])
        examples = ("\nHere are some input and output examples of the expected code:\nInput:"
                    + str(truth["inputs"]) + "\nOutput:\n" + str(truth["outputs"]))
        return (as_messages(LCB_START + row["problem"] + examples + AGENT + LCB_CODEP + CODE_SUFFIX),
                source or "LiveCodeBench_v6", truth)
    raise ValueError(f"unknown prompt wrapper {wrapper!r}")


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


@dataclass
class Prompt:
    """One RL or evaluation problem, as the stages pass it around."""
    prompt: list[dict] | str    # the chat messages, the wrapper's text in the user message (a string: one message)
    data_source: str            # which grader and prompt wrapper: toy_arith, math_dapo, livecodebench, ...
    ground_truth: object        # the answer, or a code problem's tests
    hint: str | None = None     # a privileged hint for the teacher (--mode opsd_hint)
    id: object = None           # the row's id, or its index in the file


def load_prompts(path: str, n: int | None = None, wrapper_choice: str = "row",
                 rows: list | None = None) -> list[dict]:
    """RL / eval prompts (`Prompt`s), from the
    rows of a data file, or from `rows` already in memory (the toy task's, rollout.load_prompts), named `path`
    in the log. wrapper_choice "row" wraps each row by its own data_source, "file" every row by the first
    row's, as the authors' loader does. Malformed rows are skipped and counted by reason (code problems whose
    tests the authors' grader cannot read among them); rows of a data_source no grader knows are counted and
    graded as math."""
    rows = load_rows(path) if rows is None else rows
    if wrapper_choice not in ("row", "file"):
        raise ValueError(f"unknown wrapper_choice {wrapper_choice!r}")
    wrapper = None
    if wrapper_choice == "file" and rows:
        try:  # CustomRLHFDataset._read_files_and_tokenize: the map function of dataframe['data_source'][0]
            wrapper = wrapper_for(rows[0]) if isinstance(rows[0], dict) else None
        except ValueError as e:
            raise SystemExit(f"{path}: --wrapper_choice file takes the first row's wrapper: {e}") from None
    out, bad, unknown = [], Counter(), Counter()
    for i, row in enumerate(rows):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"a row must be an object, not a {type(row).__name__}")
            messages, source, truth = wrap_prompt(row, wrapper)
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
        out.append(Prompt(messages, source, truth, row.get("hint"), row.get("id", i)))
    if bad:
        log.warning("%s: skipped %d malformed rows (%s)", path, sum(bad.values()),
                    "; ".join(f"{count} x {why}" for why, count in bad.most_common()))
    if unknown:
        log.warning("%s: %d rows have a data_source without a grader of its own (%s): graded as math with "
                    "the strict box, as the authors' reward does for every source without 'code'",
                    path, sum(unknown.values()), dict(unknown))
    if not out:
        raise SystemExit(f"{path}: no usable rows"
                         + (f"; the first problem: {next(iter(bad))}" if bad else ""))
    return out[:n] if n else out


def drop_long_prompts(prompts: list[dict], tokenizer, max_tokens: int, name: str = "") -> list[dict]:
    """The reference's filter_overlong_prompts: the prompt's messages rendered by the chat template with the
    generation prompt, *without* the tools block, must fit in max_tokens."""
    def length(p):
        text = tokenizer.apply_chat_template(as_messages(p.prompt), tokenize=False,
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


# -----------------------------------------------------------------------------
# SFT rows: a conversation sft.py can train on, or what is wrong with it

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")  # Qwen3's; a tokenizer's own in a run


def check_conversation(row, control_tokens=CONTROL_TOKENS) -> str | None:
    """What is wrong with an SFT row, in words, or None."""
    if not isinstance(row, dict) or "messages" not in row:
        return "no `messages` column"
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        return "`messages` is empty or not a list"
    saw_call = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool"):
            return f"message {i} has no valid role"
        if m["role"] == "system" and i != 0:
            return f"system message at position {i} (only index 0 is allowed)"
        if m["role"] == "tool" and not saw_call:
            return f"tool message {i} with no preceding assistant tool call"
        for token in control_tokens:
            if token in str(m.get("content") or "") or token in json.dumps(m.get("tool_calls"), default=str):
                return f"message {i} ({m['role']}) holds the control token {token} in its text"
        if m["role"] == "assistant":
            problem = check_tool_calls(m.get("tool_calls"))
            if problem:
                return f"message {i}: {problem}"
            saw_call = bool(m.get("tool_calls"))
    if not any(m["role"] == "assistant" for m in messages):
        return "no assistant turn"
    return None


def check_tool_calls(calls) -> str | None:
    """What is wrong with an assistant message's tool_calls (OpenAI form, arguments an object or a JSON
    string)."""
    if calls is None or (hasattr(calls, "__len__") and len(calls) == 0):
        return None
    if not isinstance(calls, list):
        return (f"tool_calls is a {type(calls).__name__}, not a list of "
                f"{{type, function: {{name, arguments}}}}")
    for k, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            return f"tool call {k} has no function name"
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError as e:
                return f"tool call {k}: arguments are not valid JSON ({e.msg} at character {e.pos})"
        if not isinstance(arguments, dict):
            return f"tool call {k}: arguments are a {type(arguments).__name__}, not an object"
    return None
