"""
pipeline.py: the whole toy pipeline in one command, ending with the paper's comparison table.

    1. SFT the toy teacher (clean tool use, half direct answers)   sft.py  -> runs/sft-teacher
    2. SFT the toy student on trajectories that include recoveries  sft.py  -> runs/sft-student
    3. GRPO the teacher with the tool                              grpo.py -> runs/grpo-teacher
    4. the student with the same RL budget, three ways:
         GRPO alone                                                grpo.py        -> runs/grpo-student
         GRPO + uniform on-policy distillation (OPD)               sod_distill.py -> runs/opd-student
         GRPO + step-wise on-policy distillation (SOD)             sod_distill.py -> runs/sod-student
    5. evaluate all six models on the held-out toy split           evaluate.py -> runs/eval

Every stage is the stage file's own `main` with its own config: this file only chooses the sizes.
Each student RL run can be repeated over several seeds (--seeds 0,1,2): the table then shows the
mean and the spread.

    python pipeline.py            # ~18 min on 2 CPU cores
    python pipeline.py --quick    # every stage for a handful of steps, ~2 min (the smoke test)
"""
import json
import logging
import time
from dataclasses import dataclass
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
    quick: bool = arg(False, "a few steps per stage (smoke test)")
    seeds: str = arg("0", "comma-separated seeds for the student RL runs")
    teacher_sft_epochs: int = arg(5, "SFT epochs of the teacher (5000 clean toy conversations)")
    teacher_direct_frac: float = arg(0.5, "fraction of the teacher's SFT conversations that answer without the tool "
                                          "(what its GRPO then unlearns)")
    student_sft_epochs: int = arg(4, "SFT epochs of the student (5000 toy conversations, 25% with a recovered tool error)")
    tool_failure_rate: float = arg(0.0, "fraction of tool calls that fail transiently in every rollout and evaluation")
    student_retry_frac: float = arg(0.0, "fraction of the student's SFT conversations that retry after a transient failure")
    rl_steps: int = arg(30, "RL steps of every RL run (teacher GRPO and each student run)")
    eval_n: int = arg(8, "samples per held-out problem in the final table")
    eval_prompts: int = arg(128, "held-out problems in the final table")
    skip_existing: bool = arg(True, "reuse a stage's final/ checkpoint when it already exists")


def run_stage(name: str, out_dir: Path, fn, stage_cfg, skip_existing: bool, timings: dict):
    if skip_existing and (out_dir / "final" / "config.json").exists():
        log.info("%s: reusing %s", name, out_dir / "final")
        return
    t0 = time.time()
    print(f"\n=== {name} -> {out_dir}")
    fn(stage_cfg)
    timings[name] = round(time.time() - t0, 1)
    print(f"=== {name}: {timings[name]:.0f} s")


def main(cfg: Config):
    root = Path(cfg.out_root)
    root.mkdir(parents=True, exist_ok=True)
    timings = {}
    q = cfg.quick
    sft_sizes = dict(max_steps=3, toy_examples=64, eval_prompts=0) if q else {}
    rl_sizes = dict(steps=2, prompts_per_step=2, n=4, eval_every=0, eval_prompts=4, eval_n=2) if q else \
        dict(steps=cfg.rl_steps, eval_every=10)
    rl_sizes["tool_failure_rate"] = cfg.tool_failure_rate
    seeds = [int(s) for s in cfg.seeds.split(",")]

    # 1-2. cold-start SFT. The teacher sees clean tool solutions and, in half of its data, answers given at
    # once without the tool (mental arithmetic it cannot reproduce: its GRPO learns to always use the tool);
    # the student's data also shows recoveries from failed tool calls (README: what SOD needs to matter).
    run_stage("sft teacher", root / "sft-teacher", sft.main,
              sft.Config(model="toy-teacher", toy_recovery_frac=0.0, toy_direct_frac=cfg.teacher_direct_frac,
                         epochs=cfg.teacher_sft_epochs, out_dir=str(root / "sft-teacher"), **sft_sizes),
              cfg.skip_existing, timings)
    run_stage("sft student", root / "sft-student", sft.main,
              sft.Config(model="toy-student", epochs=cfg.student_sft_epochs, toy_retry_frac=cfg.student_retry_frac,
                         out_dir=str(root / "sft-student"), **sft_sizes),
              cfg.skip_existing, timings)
    # 3. the teacher's RL
    teacher = str(root / "grpo-teacher" / "final")
    run_stage("grpo teacher", root / "grpo-teacher", grpo.main,
              grpo.Config(model=str(root / "sft-teacher" / "final"), out_dir=str(root / "grpo-teacher"), **rl_sizes),
              cfg.skip_existing, timings)
    # 4. the student, same budget three ways
    student_sft = str(root / "sft-student" / "final")
    students = {}
    for seed in seeds:
        for method in ("grpo", "opd", "sod"):
            out = root / f"{method}-student-s{seed}"
            if method == "grpo":
                stage_cfg, fn = grpo.Config(model=student_sft, out_dir=str(out), seed=seed, **rl_sizes), grpo.main
            else:
                stage_cfg = sod_distill.Config(student=student_sft, teacher=teacher, mode=method, out_dir=str(out), seed=seed, **rl_sizes)
                fn = sod_distill.main
            run_stage(f"{method} student (seed {seed})", out, fn, stage_cfg, cfg.skip_existing, timings)
            students.setdefault(method, []).append(str(out / "final"))
    # 5. one evaluation, same settings for every model
    models = {"teacher SFT": str(root / "sft-teacher" / "final"), "teacher GRPO": teacher, "student SFT": student_sft}
    eval_cfg = evaluate.Config(model=[], num_prompts=4 if q else cfg.eval_prompts, n=2 if q else cfg.eval_n,
                               tool_failure_rate=cfg.tool_failure_rate, out_dir=str(root / "eval"), seed=1234)
    t0 = time.time()
    benchmarks = evaluate.load_benchmarks(eval_cfg)
    results = {}
    for name, path in list(models.items()) + [(f"student {m.upper()}", p) for m, ps in students.items() for p in ps]:
        tokenizer = rollout.load_tokenizer(path)
        model = rollout.load_model(path, device="cpu")
        results.setdefault(name, []).append(evaluate.evaluate_engine(model, tokenizer, benchmarks, eval_cfg)["toy"])
    timings["evaluation"] = round(time.time() - t0, 1)
    table = results_table(results, eval_cfg.n)
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps({"results": results, "timings_s": timings, "seeds": seeds}, indent=2))
    print("\n" + table)
    print(f"\nseconds per stage: {timings}")
    return results


def results_table(results: dict, n: int) -> str:
    """Rows: models; columns: avg@n, pass@1, pass@n, maj@n in percent (mean +- std over seeds when several)."""
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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(rollout.parse_args(Config))
