"""
scripts/toy_gap.py: what toy models write for the knowledge gap of toy/task.py, `a = x / y` (computed as x // y).

Rolls out each checkpoint on the problems of a held-out split that open with the gap notation, as evaluate.py
samples (T = 1.0, top_p 0.6, seed 1234), and counts what the first tool call does with the first line:

    exact   print(x // y), the call the teacher's data teaches
    slash   print(x / y), the problem's own notation, which Python computes as 5.875 for 47 / 8
    other   anything else (another operator, other numbers, no call)

With --sod_runs it rolls out nothing: it reads SOD runs' training turns (steps.jsonl) and prints their mean
d_k / w_k by kind of turn, for the rollouts whose first call divides (the gap problems, as the student read
them) and the others, in the first and the last five RL steps: where SOD's weights cut the teacher's signal,
and when.

    python scripts/toy_gap.py --model runs/sft-student/final runs/grpo-student-s0/final \\
        runs/opd-student-s0/final runs/sod-student-s0/final runs/grpo-teacher/final
    python scripts/toy_gap.py --sod_runs runs/sod-student-s0 runs/sod-student-s1 runs/sod-student-s2
"""
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import rollout  # noqa: E402
from common import models  # noqa: E402
from common.cli import arg, run_script  # noqa: E402
from common.study import TURN_KINDS, read_jsonl, turn_kinds  # noqa: E402
from toy import task  # noqa: E402


@dataclass
class Config:
    """The first tool calls of toy checkpoints on the problems in the gap notation."""
    model: list = arg(["runs/sft-student/final"], "toy checkpoints, one or more")
    split: str = arg("eval", "held-out split: eval (the test split) or valid")
    num_prompts: int = arg(128, "problems of the split, of which about half are in the gap notation")
    n_samples: int = arg(8, "samples per problem")
    top_p: float = arg(0.6, "nucleus sampling, as evaluate.py")
    sod_runs: list = arg([], "SOD run folders: print their training turns' d_k / w_k by gap and by phase "
                             "instead of rolling out --model")


def first_call_kind(problem_line: str, code) -> str:
    """exact / slash / other for the first call's code against the first line `a = x / y`."""
    x, y = re.findall(r"\d+", problem_line)[:2]
    if not isinstance(code, str):
        return "other"
    code = code.strip().replace(" ", "")
    return {f"print({x}//{y})": "exact", f"print({x}/{y})": "slash"}.get(code, "other")


def turn_phases(run_dirs: list, phase_steps: int = 5) -> str:
    """Mean d_k / w_k of the SOD runs' training turns: first turn, later turns with no failed call before them,
    turns after a failed call; for rollouts whose first call divides and the others; in the first and the last
    `phase_steps` RL steps."""
    cells = {}  # (kind, divides, phase) -> [(d, w)]
    for run in run_dirs:
        records = read_jsonl(Path(run) / "steps.jsonl")
        last = max(r["rl_step"] for r in records)
        divides = {(r["rl_step"], r["traj"]): "/" in (r["tool_call"] or "") for r in records if r["step"] == 1}
        for r in records:
            phase = ("first" if r["rl_step"] <= phase_steps else
                     "last" if r["rl_step"] > last - phase_steps else None)
            kind = turn_kinds(r)[0]  # the first turn, a later one, or one after a failed call (common/study.py)
            if phase:
                cells.setdefault((kind, divides.get((r["rl_step"], r["traj"]), False), phase), []).append(
                    (r["d"], r["w"]))
    columns = [(True, "first"), (True, "last"), (False, "first"), (False, "last")]
    out = ["| turns | " + " | ".join(f"{'first call divides' if g else 'the others'}, {p} {phase_steps} steps"
                                     for g, p in columns) + " |", "|---|---|---|---|---|"]
    for kind in TURN_KINDS[:3]:
        means = [np.mean(cells[(kind, g, p)], axis=0) if cells.get((kind, g, p)) else None for g, p in columns]
        out.append(f"| {kind} | " + " | ".join(f"{m[0]:.2f} / {m[1]:.2f}" if m is not None else "-"
                                               for m in means) + " |")
    return "\n".join(out)


def main(cfg: Config):
    if cfg.sod_runs:
        print(turn_phases(cfg.sod_runs))
        return
    prompts = [p for p in rollout.load_prompts(f"toy:{cfg.split}", cfg.num_prompts)
               if task.has_gap(p.prompt[0]["content"])]
    lines = {i: p.prompt[0]["content"].split("\n")[1] for i, p in enumerate(prompts)}  # `a = x / y`
    settings = rollout.RolloutConfig(top_p=cfg.top_p)
    print(f"| checkpoint | {len(prompts)} gap problems x {cfg.n_samples}: right (%) | first call x // y (%) "
          "| x / y (%) | other (%) |\n|---|---|---|---|---|")
    for path in cfg.model:
        trajs = rollout.rollout(models.load_model(path, device="cpu"), models.load_tokenizer(path), prompts,
                                cfg.n_samples, settings, seed=1234)
        kinds = [first_call_kind(lines[t.prompt_index], t.turns[0].tool_call) for t in trajs]
        share = {k: 100 * kinds.count(k) / len(kinds) for k in ("exact", "slash", "other")}
        print(f"| {path} | {100 * sum(t.acc for t in trajs) / len(trajs):.1f} | {share['exact']:.1f} "
              f"| {share['slash']:.1f} | {share['other']:.1f} |")


if __name__ == "__main__":
    run_script(main, Config)
