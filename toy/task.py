"""
The built-in toy task: arithmetic chains that need several dependent calls to a stateless interpreter.

    "a = 347 * 29; b = a % 97; c = b + 13; what is c?"

The interpreter forgets variables between calls (as the reference's SandboxFusion does), so each call
must copy the previous call's printed number, and one bad call cascades into the next turns.

A knowledge gap, constructed: half the problems of every split open with an integer division written
`a = 47 / 8`, which the tool must compute as `print(47 // 8)`. The teacher's SFT data shows the notation as often
and always writes `//`. The student's shows it less often (sft.py --toy_gap_share) and reads it as Python does,
`print(47 / 8)`, which prints 5.875 and carries the chain on in floats to an answer the grader calls wrong, in
all but a small share of those problems (--toy_gap_known). So the student samples `//` about that often, 1% in
pipeline.py's default: GRPO's groups on these problems are nearly all wrong, while the teacher's per-token
signal points at the operator on every sample. That is the paper's setting in miniature: knowledge the teacher
has, in the student's support but rare.

Two natural tool errors exist, and the student's SFT data can recover from them:
  - referring to a variable of an earlier call -> NameError traceback;
  - writing an assignment as the last line -> the reference's auto-print turns `a = 1 * 2` into
    `print(a = 1 * 2)` -> TypeError traceback.
After such an error the context holds a traceback, which a teacher trained only on clean solutions has
never seen: the drift SOD's step weights are meant to detect.

The generator emits rows in the schemas of the real data: SFT rows as `messages` + `tools`
(Open-AgentRL-SFT-3K), RL rows as `prompt` / `data_source` / `reward_model` (Open-AgentRL-30K), plus a
`hint` column (the value of the first line) that the opsd_hint teacher of sod_distill.py reads.
Every split is a pure function of its seed, and the held-out split never overlaps the others.

    python -c "from toy import task; print(task.toy_rl_rows(1)[0])"
"""
import random

import tools

SOURCE = "toy_arith"
VARS = "abcdefgh"
INSTRUCTION = ("Solve it with the code interpreter, one step per call. The interpreter forgets "
               "variables between calls, so use the printed numbers.\n")
SPLIT_SEEDS = {"train": 1, "sft": 2, "eval": 3, "valid": 4}
HELD_OUT = ("eval", "valid")  # fixed sets (whatever the run's seed), disjoint from every other split
GAP_FRAC = 0.5  # share of every split's problems that open with the gap notation `x / y` (floor division)
GAP_DIVISORS = (2, 4, 8, 16, 32)


def steps_range(text: str) -> tuple[int, int]:
    """"2-4" -> (2, 4): how many dependent tool calls a toy problem needs (--toy_steps)."""
    try:
        low, high = (int(x) for x in text.split("-"))
        assert 1 <= low <= high <= 8
    except (ValueError, AssertionError):
        raise SystemExit("--toy_steps must be like 2-4 (from 1 to 8 dependent calls), "
                         f"not {text!r}") from None
    return low, high


def apply(op: str, x: int, y: int) -> int:
    return {"+": x + y, "-": x - y, "*": x * y, "%": x % y}[op]


def make_problem(rng: random.Random, min_steps: int = 2, max_steps: int = 4, gap: bool = False,
                 naive: bool = False) -> dict:
    """A chain of dependent operations. Returns the prompt, the answer, the clean tool calls and the hint. With
    `gap`, the first line is an integer division in the problem's notation, `a = x / y`, whose call is
    `print(x // y)`; with `naive` too, the call reads it as Python does, `print(x / y)`, and the calls and the
    answer that follow are those of the float it prints (the student's data: a wrong answer by the grader)."""
    num_steps = rng.randint(min_steps, max_steps)
    # a gap line divides by a power of two, so that the floats of Python's `/` stay short and exact (47 / 8 =
    # 5.875, and every later line of integers keeps them so): the naive reading costs the student no copying
    x, y = rng.randint(10, 99), rng.choice(GAP_DIVISORS) if gap else rng.randint(2, 40)
    op = "/" if gap else rng.choice("*+-")
    call_op = ("/" if naive else "//") if gap else op
    value = (x / y if naive else x // y) if gap else apply(op, x, y)
    lines, calls, outputs = [f"a = {x} {op} {y}"], [f"print({x} {call_op} {y})"], [value]
    hint = f"a = {value}"
    for k in range(1, num_steps):
        op = rng.choice("%+-*" if abs(value) < 1000 else "%%+-")
        c = rng.randint(2, 9) if op == "*" else rng.randint(2, 40)
        lines.append(f"{VARS[k]} = {VARS[k - 1]} {op} {c}")
        calls.append(f"print({value} {op} {c})")
        value = apply(op, value, c)
        outputs.append(value)
    question = (INSTRUCTION + "\n".join(lines) + f"\nWhat is {VARS[num_steps - 1]}? "
                "Put the final answer in \\boxed{}.")
    return {"question": question, "answer": str(value), "calls": calls, "outputs": outputs, "lines": lines,
            "hint": hint}


def has_gap(question: str) -> bool:
    """Does a problem open with the gap notation? (No other line divides.)"""
    return " / " in question


def traceback_text(line: str, error: str, caret_col: int | None = None) -> str:
    """The text CPython 3.11 prints for an error on line 1 of /tmp/main.py (checked against the sandbox in
    tests)."""
    caret = "" if caret_col is None else " " * (4 + caret_col) + "^\n"
    return (f'Traceback (most recent call last):\n  File "/tmp/main.py", line 1, in <module>\n'
            f'    {line}\n{caret}{error}\n')


def tool_call(code: str) -> dict:
    return {"type": "function", "function": {"name": tools.TOOL_NAME, "arguments": {"code": code}}}


def sft_conversation(problem: dict, rng: random.Random, recovery: bool, retry: bool = False,
                     direct: bool = False) -> list[dict]:
    """A solved toy problem as chat messages. With `recovery`, one step first fails by the model's fault
    (a traceback) and is then redone; with `retry`, one call meets a transient sandbox failure (the
    reference's "no stdout here") and the same call is sent again; with `direct`, the answer is given at
    once, without the tool (right in the data, but mental arithmetic a tiny model cannot reproduce)."""
    messages = [{"role": "user", "content": problem["question"]}]
    if direct:
        return messages + [{"role": "assistant", "content": f"The answer is \\boxed{{{problem['answer']}}}."}]
    bad_step = rng.randrange(len(problem["calls"])) if recovery else -1
    flaky_step = rng.randrange(len(problem["calls"])) if retry else -1
    for k, (call, out) in enumerate(zip(problem["calls"], problem["outputs"])):
        if k == flaky_step:
            messages += [{"role": "assistant", "content": "", "tool_calls": [tool_call(call)]},
                         {"role": "tool", "content": tools.NO_STDOUT}]
        if k == bad_step:
            if k == 0:  # assignment as the last line: auto-print makes it print(a = ...)
                wrong = problem["lines"][0]
                text = traceback_text(f"print({wrong})",
                                      "TypeError: 'a' is an invalid keyword argument for print()")
            else:  # refers to the previous call's variable, which the interpreter forgot
                var = VARS[k - 1]
                wrong = call.replace(str(problem["outputs"][k - 1]), var, 1)
                text = traceback_text(wrong, f"NameError: name '{var}' is not defined",
                                      caret_col=wrong.index(var))
            messages += [{"role": "assistant", "content": "", "tool_calls": [tool_call(wrong)]},
                         {"role": "tool", "content": text}]
        messages += [{"role": "assistant", "content": "", "tool_calls": [tool_call(call)]},
                     {"role": "tool", "content": f"{out}\n"}]
    messages.append({"role": "assistant", "content": f"The answer is \\boxed{{{problem['answer']}}}."})
    return messages


def problems(n: int, split: str, seed: int, min_steps: int = 2, max_steps: int = 4,
             gap_share: float = 1.0, gap_known: float = 1.0) -> list[dict]:
    """n distinct problems of a split. The held-out splits, eval (the test set) and valid (for choices made
    while developing), never share a problem with each other or with train and sft. A problem opens with the
    gap notation with probability GAP_FRAC x gap_share; an evenly spaced share gap_known of those is solved with
    `//`, the others read `/` as Python does (both 1: as in every held-out split)."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown toy split {split!r}; the splits are {', '.join(SPLIT_SEEDS)}")
    rng = random.Random(SPLIT_SEEDS[split] * 1_000_003 + seed)
    held_out = set()
    for other in HELD_OUT[:HELD_OUT.index(split)] if split in HELD_OUT else HELD_OUT:
        other_rng = random.Random(SPLIT_SEEDS[other] * 1_000_003)
        held_out |= {make_problem(other_rng, min_steps, max_steps, other_rng.random() < GAP_FRAC)["question"]
                     for _ in range(512)}
    out, seen, gaps = [], set(), 0
    while len(out) < n:
        gap = rng.random() < GAP_FRAC * gap_share
        # evenly spaced, not drawn: every seed's data solves the same share of its gap problems with `//`
        naive = gap and int((gaps + 1) * gap_known) == int(gaps * gap_known)
        p = make_problem(rng, min_steps, max_steps, gap, naive)
        if p["question"] not in seen and p["question"] not in held_out:
            seen.add(p["question"])
            out.append(p)
            gaps += gap
    return out


def held_out_conversations(n: int, steps: tuple[int, int] = (2, 4)) -> list[list[dict]]:
    """n problems of the validation split, solved with the tool and without a slip: the conversations on which
    sft.call_accuracy checks a model's tool calls."""
    rng = random.Random(0)  # drawn from only by recoveries and retries, which these conversations have none of
    return [sft_conversation(p, rng, recovery=False) for p in problems(n, "valid", 0, *steps)]


def rl_rows(n: int, split: str = "train", seed: int = 0, steps: tuple[int, int] = (2, 4)) -> list[dict]:
    """Toy prompts in the RL schema of the real data, with a `hint` column."""
    if split in HELD_OUT:
        seed = 0  # the held-out sets are fixed, whatever the run's seed
    return [{"prompt": [{"role": "user", "content": p["question"]}], "data_source": SOURCE,
             "reward_model": {"ground_truth": p["answer"]}, "ability": "math", "agent_name": "tool_agent",
             "hint": p["hint"], "extra_info": {"index": i, "split": split, "num_steps": len(p["calls"])}}
            for i, p in enumerate(problems(n, split, seed, *steps))]


def sft_rows(n: int, recovery_frac: float = 0.25, seed: int = 0, retry_frac: float = 0.0,
             direct_frac: float = 0.0, steps: tuple[int, int] = (2, 4), gap_share: float = 1.0,
             gap_known: float = 1.0) -> list[dict]:
    """Toy trajectories in the SFT schema of the real data (messages + tools). `gap_share` scales how often a
    problem is in the gap notation (1: half of them, as in the held-out splits), `gap_known` is the share of
    those solved with `//` (1: all, the teacher's; the rest read `/` as Python does)."""
    rng = random.Random(seed)
    rows = []
    for p in problems(n, "sft", seed, *steps, gap_share=gap_share, gap_known=gap_known):
        recovery = rng.random() < recovery_frac
        # no extra draw when off: old seeds give old data
        retry = retry_frac > 0 and rng.random() < retry_frac
        direct = direct_frac > 0 and rng.random() < direct_frac
        rows.append({"messages": sft_conversation(p, rng, recovery, retry, direct),
                     "tools": [tools.TOOL_SCHEMA]})
    return rows
