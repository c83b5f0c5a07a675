"""
pipeline.py: the whole toy pipeline in one command, ending with the paper's comparison table.

    1. SFT the toy teacher (clean tool use, half direct answers)   sft.py  -> runs/sft-teacher
    2. SFT the toy student on trajectories that include recoveries  sft.py  -> runs/sft-student
    3. GRPO the teacher with the tool                              grpo.py -> runs/grpo-teacher
    4. the student with the same RL budget, three ways:
         GRPO alone                                                grpo.py        -> runs/grpo-student-s0
         GRPO + uniform on-policy distillation (OPD)               sod_distill.py -> runs/opd-student-s0
         GRPO + step-wise on-policy distillation (SOD)             sod_distill.py -> runs/sod-student-s0
    5. evaluate all six models on the held-out toy split           evaluate.py    -> runs/eval

Every stage is the stage file's own `main` with its own config: this file only chooses the sizes.
Each student RL run can be repeated over several seeds (--seeds 0,1,2): the table then shows the
mean and the spread.

A stage's output is reused only when it was made by the same settings, from the same inputs (the weights of
the checkpoints it starts from) and by the same code; a stage that was interrupted resumes from its last
checkpoint; anything else reruns. Each stage says which of the three happened.

    python pipeline.py                 # ~18 min on 2 CPU cores
    python pipeline.py --quick         # every stage for a handful of steps, ~2 min (a smoke test: numbers mean nothing)
    python pipeline.py --seeds 0,1,2   # three seeds of each student RL run
"""
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import evaluate
import grpo
import rollout
import sft
import sod_distill
from rollout import arg

log = logging.getLogger("pipeline")


@dataclass
class Config:
    """The toy pipeline: SFT, GRPO teacher, GRPO / OPD / SOD students, evaluation."""
    out_root: str = arg("runs", "every stage writes under this folder")
    quick: bool = arg(False, "a few steps per stage and a tiny evaluation: a smoke test, its numbers mean nothing")
    seeds: str = arg("0", "comma-separated seeds for the student RL runs")
    teacher_sft_epochs: int = arg(5, "SFT epochs of the teacher (5000 clean toy conversations)")
    teacher_direct_frac: float = arg(0.5, "fraction of the teacher's SFT conversations that answer without the tool "
                                          "(what its GRPO then unlearns)")
    student_sft_epochs: int = arg(4, "SFT epochs of the student (5000 toy conversations, 25 percent with a "
                                     "recovered tool error)")
    tool_failure_rate: float = arg(0.0, "fraction of tool calls that fail transiently in every rollout and evaluation")
    student_retry_frac: float = arg(0.0, "fraction of the student's SFT conversations that retry after a transient failure")
    rl_steps: int = arg(-1, "RL steps of every RL run, teacher GRPO and each student run (-1: 30, or 2 with --quick)")
    eval_n: int = arg(-1, "samples per held-out problem in the final table (-1: 8, or 2 with --quick)")
    eval_prompts: int = arg(-1, "held-out problems in the final table (-1: 128, or 4 with --quick)")


# -----------------------------------------------------------------------------
# Stages that know where they come from

def fingerprint(stage_cfg, inputs: list[str]) -> dict:
    """What a stage's output depends on: its settings (minus where it writes and whether it resumes), the weights
    of the checkpoints it starts from, and the code."""
    settings = {k: v for k, v in asdict(stage_cfg).items() if k not in ("out_dir", "resume", "device")}
    weights = {}
    for path in inputs:
        f = Path(path) / "model.safetensors"
        weights[path] = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else path
    return {"settings": settings, "inputs": weights, "code_version": rollout.code_version()}


def run_stage(name: str, out_dir: Path, fn, stage_cfg, inputs: list[str], timings: dict):
    """Reuse out_dir/final if the same settings, inputs and code made it; resume an interrupted run of the same
    stage; otherwise run it from the start (the stage itself clears what an earlier run left)."""
    want = fingerprint(stage_cfg, inputs)
    record = out_dir / "pipeline_stage.json"
    had = json.loads(record.read_text()) if record.exists() else None
    print(f"\n=== {name} -> {out_dir}")
    if had == want and (out_dir / "final" / "config.json").exists():
        print(f"=== {name}: reused (made by the same settings, inputs and code)")
        return
    if had == want and rollout.latest_checkpoint(out_dir) is not None:
        print(f"=== {name}: resuming from {rollout.latest_checkpoint(out_dir).name}")
        stage_cfg.resume = True
    elif had is not None:
        before, now = had["settings"], want["settings"]
        changed = ", ".join(f"{k}: {before.get(k)} -> {now[k]}" for k in now if before.get(k) != now[k])
        why = (f"settings changed ({changed})" if changed else
               "its inputs changed" if had["inputs"] != want["inputs"] else "the code changed")
        print(f"=== {name}: running again, {why}")
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(want, indent=1, default=str) + "\n")
    t0 = time.time()
    fn(stage_cfg)
    timings[name] = round(time.time() - t0, 1)
    print(f"=== {name}: {timings[name]:.0f} s")


def evaluate_model(name: str, path: str, eval_cfg, benchmarks: dict, cache_dir: Path) -> dict:
    """Held-out metrics of one checkpoint, reused when the same weights were evaluated the same way."""
    want = fingerprint(eval_cfg, [path])
    cache = cache_dir / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".json")
    if cache.exists() and json.loads(cache.read_text())["fingerprint"] == want:
        print(f"  {name}: reused evaluation of {path}")
        return json.loads(cache.read_text())["results"]
    t0 = time.time()
    tokenizer = rollout.load_tokenizer(path)
    results = evaluate.evaluate_engine(rollout.load_model(path, device="cpu"), tokenizer, benchmarks, eval_cfg)["toy"]
    cache.write_text(json.dumps({"fingerprint": want, "results": results}, indent=1, default=str))
    print(f"  {name}: evaluated {path} in {time.time() - t0:.0f} s")
    return results


# -----------------------------------------------------------------------------

def main(cfg: Config):
    root = Path(cfg.out_root)
    q = cfg.quick
    rl_steps = cfg.rl_steps if cfg.rl_steps >= 0 else (2 if q else 30)
    eval_n = cfg.eval_n if cfg.eval_n > 0 else (2 if q else 8)
    eval_prompts = cfg.eval_prompts if cfg.eval_prompts > 0 else (4 if q else 128)
    sft_sizes = dict(max_steps=3, toy_examples=64, eval_prompts=0) if q else {}
    rl_sizes = dict(steps=rl_steps, eval_every=0 if q else 10, tool_failure_rate=cfg.tool_failure_rate)
    if q:
        rl_sizes.update(prompts_per_step=2, n_samples=4, eval_prompts=4, eval_n=2)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    timings = {}

    # 1-2. cold-start SFT. The teacher sees clean tool solutions and, in half of its data, answers given at
    # once without the tool (mental arithmetic it cannot reproduce: its GRPO learns to always use the tool);
    # the student's data also shows recoveries from failed tool calls (README: what SOD needs to matter).
    run_stage("sft teacher", root / "sft-teacher", sft.main,
              sft.Config(model="toy-teacher", toy_recovery_frac=0.0, toy_direct_frac=cfg.teacher_direct_frac,
                         epochs=cfg.teacher_sft_epochs, out_dir=str(root / "sft-teacher"), **sft_sizes), [], timings)
    run_stage("sft student", root / "sft-student", sft.main,
              sft.Config(model="toy-student", epochs=cfg.student_sft_epochs, toy_retry_frac=cfg.student_retry_frac,
                         out_dir=str(root / "sft-student"), **sft_sizes), [], timings)
    # 3. the teacher's RL
    teacher_sft, teacher = str(root / "sft-teacher" / "final"), str(root / "grpo-teacher" / "final")
    run_stage("grpo teacher", root / "grpo-teacher", grpo.main,
              grpo.Config(model=teacher_sft, out_dir=str(root / "grpo-teacher"), **rl_sizes), [teacher_sft], timings)
    # 4. the student, same budget three ways
    student_sft = str(root / "sft-student" / "final")
    students = {}
    for seed in seeds:
        for method in ("grpo", "opd", "sod"):
            out = root / f"{method}-student-s{seed}"
            if method == "grpo":
                stage_cfg, fn, inputs = grpo.Config(model=student_sft, out_dir=str(out), seed=seed, **rl_sizes), \
                    grpo.main, [student_sft]
            else:
                stage_cfg = sod_distill.Config(student=student_sft, teacher=teacher, mode=method, out_dir=str(out),
                                               seed=seed, **rl_sizes)
                fn, inputs = sod_distill.main, [student_sft, teacher]
            run_stage(f"{method} student (seed {seed})", out, fn, stage_cfg, inputs, timings)
            students.setdefault(method, []).append(str(out / "final"))
    # 5. one evaluation, same settings for every model
    print(f"\n=== evaluation -> {root / 'eval'} ({eval_prompts} held-out problems x {eval_n} samples)")
    eval_cfg = evaluate.Config(model=[], num_prompts=eval_prompts, n_samples=eval_n,
                               tool_failure_rate=cfg.tool_failure_rate, out_dir=str(root / "eval"), seed=1234)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    benchmarks = evaluate.load_benchmarks(eval_cfg)
    models = [("teacher SFT", teacher_sft), ("teacher GRPO", teacher), ("student SFT", student_sft)]
    models += [(f"student {m.upper()} (seed {s})", p) for m, ps in students.items() for s, p in zip(seeds, ps)]
    results = {}
    for name, path in models:
        results.setdefault(name.split(" (seed")[0], []).append(evaluate_model(name, path, eval_cfg, benchmarks, root / "eval"))
    timings["evaluation"] = round(time.time() - t0, 1)
    table = results_table(results, eval_n)
    if q:
        table += "\n\n(--quick: a few steps per stage and a tiny evaluation; these numbers mean nothing)"
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps({"results": results, "timings_s": timings, "seeds": seeds,
                                                   "config": asdict(cfg)}, indent=2))
    print("\n" + table)
    print(f"\nseconds per stage (stages that ran): {timings}")
    return results


def results_table(results: dict, n: int) -> str:
    """Rows: models; columns: avg@n, pass@n, maj@n, best@n in percent (mean +- std over seeds when several)."""
    metrics = [f"avg@{n}", f"pass@{n}", f"maj@{n}", f"best@{n}(bootstrap)"]
    lines = ["| model | " + " | ".join(metrics) + " | tool calls / sample | tool error rate |",
             "|---|" + "---|" * (len(metrics) + 2)]
    for name, runs in results.items():
        cells = []
        for m in metrics + ["tool_calls_per_sample", "tool_error_rate"]:
            values = np.array([r[m] for r in runs]) * (1 if m == "tool_calls_per_sample" else 100)
            cells.append(f"{values.mean():.1f}" + (f" ± {values.std():.1f}" if len(values) > 1 else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    rollout.run_script(main, Config)
