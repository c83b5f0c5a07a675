"""
pipeline.py: the whole toy pipeline in one command, ending with the paper's comparison table.

    1. SFT the toy teacher (clean tool use, half direct answers)   sft.py  -> runs/sft-teacher
       and check its tool calls (a few more epochs if it copies     sft.py  -> runs/sft-teacher-checked
       them wrong)
    2. SFT the toy student on trajectories that include recoveries  sft.py  -> runs/sft-student
    3. GRPO the teacher with the tool                              grpo.py -> runs/grpo-teacher
    4. the student with the same RL budget, three ways (20 steps each by default):
         GRPO alone                                                grpo.py        -> runs/grpo-student-s0
         GRPO + uniform on-policy distillation (OPD)               sod_distill.py -> runs/opd-student-s0
         GRPO + step-wise on-policy distillation (SOD)             sod_distill.py -> runs/sod-student-s0
    5. evaluate every model on the held-out toy test split         evaluate.py    -> runs/eval

Every stage is the stage file's own `main` with its own config: this file only chooses the sizes.

On two cores the stages run two at a time (--workers), each in a process of its own at one thread, with its
output in its folder's stage.log: the toy's stages lose less to the second thread than they gain from a second
stage beside them (common/jobs.py). The SFT stages, which lose most, run alone with both threads (the student's
when it is one checkpoint for every seed; on an AMD EPYC with AVX2 an SFT trains to the same bits at one thread
and at two, on an Intel Xeon with AVX-512 it does not: docs/results.md). Every other stage runs at one thread,
as it would with OMP_NUM_THREADS=1, so from the same SFT checkpoints the weights are the same as
OMP_NUM_THREADS=1's on any CPU. --workers 1 runs the stages one after another in this process, at every
thread: there, at two threads, a rollout's sampled tokens can differ from one thread's (torch's CPU attention
kernel for one generated token rounds by thread count; docs/results.md).
RL runs are evaluated once, in the final table (--rl_validation: none); the teacher checks (--teacher_only)
also evaluate the teacher on the validation split before and after its GRPO, and the study every RL run.

The toy holds a knowledge gap (toy/task.py): half of every problem set opens with an integer division written
`x / y`, which the tool must compute as `x // y`. The teacher's SFT data always does; the student's shows the
notation less often and reads `/` as Python does in all but 1% of those problems (--student_gap_share,
--student_gap_known), so the student's samples get them right only now and then: GRPO's groups there are nearly
all wrong, and the teacher's per-token signal points at the operator.

Three presets. The default is a short run (one seed, the teacher's GRPO 30 steps, each student's RL 20: GRPO and
SOD at lr 2e-4, OPD at 3e-4; 11 to 16 min on 2 cores). --quick runs every stage for a handful of steps (a smoke
test whose numbers mean nothing). --study runs the default's recipe over five seeds, each with its own student
SFT, on 256 test problems x 8 samples, with a validation curve every 5 RL steps: bootstrap intervals, paired
differences, the SOD students' step divergences and a picture of validation accuracy against RL step
(runs-study/study.png). Any flag given explicitly overrides its preset value (common/presets.py).

A stage's output is reused only when it was made by the same settings, from the same inputs (the weights of
the checkpoints it starts from) and by the same code; a stage that was interrupted resumes from its last
checkpoint; anything else reruns. Each stage says which of the three happened (common/stages.py).

    python pipeline.py                 # the short default
    python pipeline.py --quick         # the smoke test
    python pipeline.py --study         # weak student, strong teacher, five seeds
    python pipeline.py --teacher_only --teacher_seed 1 --out_root runs-teacher-s1   # the teacher's stages alone
"""
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

import evaluate
import grpo
import sft
import sod_distill
import tools
from common import jobs, models, sandbox, stages
from common.cli import arg, run_script
from common.presets import METHODS, QUICK_RL, QUICK_SFT, UNSET, UNSET_FRACTION, resolve, student_lrs
from common.study import (
    failure_table,
    plot_study,
    results_table,
    same_budget,
    split_table,
    study_tables,
    turn_table,
)
from toy import task


@dataclass
class Config:
    """The toy pipeline: SFT, GRPO teacher, GRPO / OPD / SOD students, evaluation."""
    quick: bool = arg(False, "a few steps per stage and a tiny evaluation: a smoke test, its numbers mean "
                             "nothing")
    study: bool = arg(False, "a weak student and a strong teacher, five seeds, intervals and paired "
                             "differences (docs/results.md: the study)")
    out_root: str = arg("", "every stage writes under this folder (empty: runs, or runs-study with --study)")
    seeds: str = arg("", "comma-separated seeds of the student runs (empty: 0, or 0,1,2,3,4 with --study)")
    seed_student_sft: bool = arg(False, "each seed gets its own student SFT (--study: on), not one shared "
                                        "checkpoint")
    toy_steps: str = arg("", "dependent tool calls per toy problem, e.g. 2-4 (empty: the preset's)")
    tool_failure_rate: float = arg(UNSET_FRACTION, "fraction of tool calls that fail transiently, in every "
                                                   "rollout and evaluation (-1: the preset's)")
    teacher_seed: int = arg(0, "seed of the teacher's SFT and GRPO (data order, initialisation, sampling)")
    teacher_only: bool = arg(False, "run and evaluate the teacher's two stages only (checks of the teacher "
                                    "recipe: docs/results.md)")
    teacher_model: str = arg("", "toy architecture of the teacher: toy-teacher (4 layers x 96), "
                                 "toy-teacher-small (3 x 96) or toy-teacher-large (4 x 128) "
                                 "(empty: the preset's)")
    teacher_sft_epochs: int = arg(UNSET, "SFT epochs of the teacher (-1: the preset's)")
    teacher_direct_frac: float = arg(UNSET_FRACTION, "fraction of the teacher's SFT data answered without the "
                                                     "tool, which its GRPO unlearns (-1: the preset's)")
    teacher_retry_frac: float = arg(UNSET_FRACTION, "fraction of the teacher's SFT data that sends a call again "
                                                    "after a transient tool failure (-1: the preset's)")
    teacher_min_call_acc: float = arg(UNSET_FRACTION, "the teacher's SFT must write at least this fraction of "
                                                      "the tool calls of 256 validation conversations right "
                                                      "(teacher-forced, sft.call_accuracy); below it, its SFT "
                                                      "goes on for --teacher_more_epochs, at most twice, and the "
                                                      "pipeline stops if it still falls short (0: no check; -1: "
                                                      "the preset's)")
    teacher_more_epochs: int = arg(UNSET, "epochs of each continuation of the teacher's SFT (-1: the preset's)")
    teacher_more_lr: float = arg(UNSET_FRACTION, "peak learning rate of each continuation of the teacher's SFT, "
                                                 "with the same warmup and cosine (-1: the preset's)")
    sft_micro_batch_size: int = arg(UNSET, "sequences per forward pass of both SFT stages; below the batch of "
                                           "32, each batch is sorted by length first, to pad less (the same "
                                           "loss, other roundings; -1: the preset's)")
    student_sft_epochs: int = arg(UNSET, "SFT epochs of the student (-1: the preset's)")
    student_sft_examples: int = arg(UNSET, "toy conversations of the student's SFT (-1: the preset's)")
    student_recovery_frac: float = arg(UNSET_FRACTION, "fraction of the student's SFT data with a failed tool "
                                                       "call that is then redone (-1: the preset's)")
    student_retry_frac: float = arg(UNSET_FRACTION, "fraction of the student's SFT data that retries after a "
                                                    "transient tool failure (-1: the preset's)")
    student_gap_share: float = arg(UNSET_FRACTION, "how often the student's SFT problems use the toy's gap "
                                                   "notation, relative to the teacher's (-1: the preset's)")
    student_gap_known: float = arg(UNSET_FRACTION, "share of those its data solves with `//`, the rest with "
                                                   "Python's `/` (the teacher's: all; -1: the preset's)")
    student_direct_frac: float = arg(UNSET_FRACTION, "fraction of the student's SFT data answered at once, "
                                                     "without the tool (-1: the preset's)")
    max_response_tokens: int = arg(UNSET, "tokens per trajectory, tool tokens included, in RL and evaluation "
                                          "(-1: the preset's)")
    rl_steps: int = arg(UNSET, "RL steps of each student run, GRPO, OPD and SOD alike (-1: the preset's)")
    teacher_rl_steps: int = arg(UNSET, "RL steps of the teacher's GRPO (-1: the preset's)")
    student_rl_lr: str = arg("", "learning rate of the student RL runs, one per method as GRPO,OPD,SOD, or one "
                                 "value for all three (empty: the preset's)")
    rl_validation: str = arg("", "which RL runs also evaluate on the validation split, at the start, every "
                                 "--rl_eval_every steps and at the end: none, teacher or all (empty: the "
                                 "preset's: none, teacher with --teacher_only, all with --study); every model "
                                 "is evaluated in the final table either way")
    rl_eval_every: int = arg(UNSET, "validation evaluation every N steps of those RL runs (0: at the start and "
                                    "the end only; -1: the preset's)")
    rl_eval_prompts: int = arg(UNSET, "validation problems of each evaluation during RL (-1: the preset's)")
    rl_eval_n: int = arg(UNSET, "samples per validation problem during RL (-1: the preset's)")
    eval_n: int = arg(UNSET, "samples per test problem in the final table (-1: the preset's)")
    eval_prompts: int = arg(UNSET, "test problems in the final table (-1: the preset's)")
    sandbox: str = arg("warm", "sandbox of every stage's tool calls: warm or cold (a new interpreter per call)")
    sandbox_python: str = arg("", "interpreter of the sandbox (empty: $SOD_SANDBOX_PYTHON, else the trainer's "
                                  "own); the toy's tool code needs the standard library alone")
    workers: int = arg(0, "stages run side by side, each in a process of its own with an equal share of the "
                          "threads, the teacher's SFT alone with all of them (0: two when torch has two threads "
                          "or more, else one; 1: one after another in this process, at every thread)")
    eval_split: str = arg("test", "split of the final table: test, or valid while choosing settings "
                                  "(the test split is only for final numbers)")


class Checkpoint(NamedTuple):
    """A model of the final table."""
    row: str           # its row: "teacher GRPO", "student SOD", ...
    seed: int | None   # None: the teacher's
    path: str          # the checkpoint
    job: str           # the job that makes it

    @property
    def label(self) -> str:
        return self.row if self.seed is None else f"{self.row} (seed {self.seed})"


def rl_sizes(cfg: Config, validate: bool) -> dict:
    """An RL stage's sizes; without validation it evaluates nothing until the final table (--eval_every -1)."""
    sizes = dict(eval_every=cfg.rl_eval_every, eval_prompts=cfg.rl_eval_prompts, eval_n=cfg.rl_eval_n,
                 tool_failure_rate=cfg.tool_failure_rate, toy_steps=cfg.toy_steps,
                 max_response_tokens=cfg.max_response_tokens, sandbox=cfg.sandbox,
                 sandbox_python=cfg.sandbox_python) | (QUICK_RL if cfg.quick else {})
    if not validate:
        sizes = {k: v for k, v in sizes.items() if k not in ("eval_prompts", "eval_n")} | {"eval_every": -1}
    return sizes


def teacher_call_accuracy(checkpoint: str, toy_steps: str) -> float:
    """The teacher's check (common/stages.py): the fraction of the tool calls of solved validation conversations
    that a checkpoint writes right, teacher-forced."""
    held_out = task.held_out_conversations(stages.CHECK_CONVERSATIONS, task.steps_range(toy_steps))
    model = models.load_model(checkpoint, device="cpu")
    return sft.call_accuracy(model, models.load_tokenizer(checkpoint), held_out, [tools.TOOL_SCHEMA])


def toy_metrics(path: str, eval_cfg: evaluate.Config) -> dict:
    """A checkpoint's metrics in the final table (evaluate.py)."""
    tokenizer = models.load_tokenizer(path)
    return evaluate.evaluate_engine(models.load_model(path, device="cpu"), tokenizer,
                                    evaluate.load_benchmarks(eval_cfg), eval_cfg)["toy"]


# -----------------------------------------------------------------------------

def main(cfg: Config):
    cfg = resolve(cfg)
    # every stage's tool calls, SFT's final greedy check included
    sandbox.configure(cfg.sandbox, python=cfg.sandbox_python)
    root = Path(cfg.out_root)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    student_seeds = [] if cfg.teacher_only else seeds  # --teacher_only: no student stage, row or table
    # below the batch size, each SFT batch is sorted by length before it is cut into micro-batches (sft.py)
    sft_sizes = dict(QUICK_SFT if cfg.quick else {}, micro_batch_size=cfg.sft_micro_batch_size,
                     sort_by_length=cfg.sft_micro_batch_size < sft.Config.batch_size)

    # Every stage and every evaluation is a job; a job lists the jobs whose checkpoints it starts from. They run
    # one after another, or side by side (--workers), in this order of priority: the teacher's chain is the
    # longest, so it goes first.
    # 1-2. cold-start SFT. The teacher sees clean tool solutions (and, by default, answers given at once
    # without the tool, which its GRPO unlearns); the student's data also shows recoveries from failed tool
    # calls and retries after transient failures, which the teacher never sees: where SOD's step weights
    # matter. The teacher's SFT is checked before its GRPO (stages.sft_teacher_checked), with every thread:
    # one thread slows it down most (common/jobs.py).
    teacher_sft = Checkpoint("teacher SFT", None, str(root / "sft-teacher-checked"), "sft teacher")
    teacher_sft_cfg = sft.Config(model=cfg.teacher_model, toy_recovery_frac=0.0,
                                 toy_direct_frac=cfg.teacher_direct_frac, toy_retry_frac=cfg.teacher_retry_frac,
                                 toy_steps=cfg.toy_steps, epochs=cfg.teacher_sft_epochs, seed=cfg.teacher_seed,
                                 out_dir=str(root / "sft-teacher"), **sft_sizes)
    plan = [jobs.Job("sft teacher", stages.sft_teacher_checked,
                     (root, teacher_sft_cfg, cfg.teacher_min_call_acc, cfg.teacher_more_epochs,
                      cfg.teacher_more_lr, sft.main, teacher_call_accuracy),
                     root / "sft-teacher" / "stage.log", alone=True)]
    # 3. the teacher's RL
    teacher = Checkpoint("teacher GRPO", None, str(root / "grpo-teacher" / "final"), "grpo teacher")
    plan.append(stages.stage_job(
        "grpo teacher", root / "grpo-teacher", grpo.main,
        grpo.Config(model=teacher_sft.path, out_dir=str(root / "grpo-teacher"), seed=cfg.teacher_seed,
                    steps=cfg.teacher_rl_steps, **rl_sizes(cfg, cfg.rl_validation != "none")),
        [teacher_sft.path], after=[teacher_sft.job]))
    student_sfts = {}  # seed -> its SFT checkpoint (without --seed_student_sft: the first seed's, shared)
    for seed in (student_seeds if cfg.seed_student_sft else student_seeds[:1]):
        out = root / (f"sft-student-s{seed}" if cfg.seed_student_sft else "sft-student")
        name = f"sft student (seed {seed})" if cfg.seed_student_sft else "sft student"
        plan.append(stages.stage_job(name, out, sft.main, sft.Config(
            model="toy-student", epochs=cfg.student_sft_epochs, toy_recovery_frac=cfg.student_recovery_frac,
            toy_retry_frac=cfg.student_retry_frac, toy_direct_frac=cfg.student_direct_frac,
            toy_gap_share=cfg.student_gap_share, toy_gap_known=cfg.student_gap_known,
            toy_steps=cfg.toy_steps, seed=seed, out_dir=str(out),
            **{"toy_examples": cfg.student_sft_examples, **sft_sizes}), [],
            alone=not cfg.seed_student_sft))  # one student SFT: alone, at every thread (as the teacher's)
        student_sfts[seed] = Checkpoint("student SFT", seed, str(out / "final"), name)
    student_sfts = {s: student_sfts.get(s, student_sfts[seeds[0]])._replace(seed=s) for s in student_seeds}
    # 4. the student, same budget three ways (each method at its own lr, chosen on the validation split)
    students, lr = {m: [] for m in METHODS}, student_lrs(cfg.student_rl_lr)  # method -> its runs; -> its lr
    student_rl = dict(rl_sizes(cfg, cfg.rl_validation == "all"), steps=cfg.rl_steps)
    for seed, start in student_sfts.items():
        for method, runs in students.items():
            name, out = f"{method} student (seed {seed})", root / f"{method}-student-s{seed}"
            if method == "grpo":
                plan.append(stages.stage_job(name, out, grpo.main, grpo.Config(
                    model=start.path, out_dir=str(out), seed=seed, lr=lr[method], **student_rl),
                    [start.path], after=[start.job]))
            else:
                plan.append(stages.stage_job(name, out, sod_distill.main, sod_distill.Config(
                    student=start.path, teacher=teacher.path, mode=method, out_dir=str(out), seed=seed,
                    lr=lr[method], **student_rl), [start.path, teacher.path], after=[start.job, teacher.job]))
            runs.append(Checkpoint(f"student {method.upper()}", seed, str(out / "final"), name))
    # 5. one evaluation on the test split, same settings for every model
    eval_cfg = evaluate.Config(model=[], data="toy" if cfg.eval_split == "test" else "toy:valid",
                               num_prompts=cfg.eval_prompts, n_samples=cfg.eval_n, toy_steps=cfg.toy_steps,
                               max_response_tokens=cfg.max_response_tokens,
                               tool_failure_rate=cfg.tool_failure_rate, sandbox=cfg.sandbox,
                               sandbox_python=cfg.sandbox_python,
                               out_dir=str(root / "eval"), seed=1234)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    table_models = [teacher_sft, teacher, *student_sfts.values(), *(c for runs in students.values() for c in runs)]
    plan += [stages.evaluation_job(m.label, m.path, toy_metrics, eval_cfg, root / "eval", after=m.job)
             for m in table_models]

    print(f"the final table: {cfg.eval_prompts} {cfg.eval_split} problems x {cfg.eval_n} samples "
          f"-> {root / 'eval'}")
    t_start, threads = time.time(), torch.get_num_threads()
    workers = cfg.workers or (1 if cfg.teacher_only else min(2, threads))  # the teacher alone: one chain
    print(f"{len(plan)} jobs, {workers} at a time" + (f", {max(1, threads // workers)} thread(s) each"
                                                     if workers > 1 else ""))
    finished = jobs.run(plan, workers, max(1, threads // workers), setup=stages.setup_process,
                        setup_args=(cfg.sandbox, cfg.sandbox_python),
                        on_done=stages.print_done if workers > 1 else None)
    # seconds per stage that ran, in the order they ended, then the evaluations' own seconds, added up
    timings = {name: r.seconds for name, r in finished.items()
               if r.seconds is not None and not name.startswith("evaluate ")}
    timings["evaluation"] = round(sum((r.seconds or 0.0 for name, r in finished.items()
                                       if name.startswith("evaluate ")), 0.0), 1)
    timings["wall clock"] = round(time.time() - t_start, 1)
    results = {}
    for m in table_models:
        results.setdefault(m.row, {})[m.seed] = finished[f"evaluate {m.label}"].results
    by_seed = {method: {c.seed: c.path for c in runs} for method, runs in students.items()}
    budget = same_budget(root, by_seed) if student_seeds else {}  # refuses runs that did not share one budget
    table = results_table(results, cfg.eval_n)
    if len(student_seeds) > 1:
        table += "\n\n" + study_tables(results, cfg.eval_n, student_seeds)
        plot_study(root, student_seeds, root / "study.png")
    # the knowledge gap: where the teacher knows what the student's data rarely shows, and everywhere else
    problems = task.rl_rows(cfg.eval_prompts, "eval" if cfg.eval_split == "test" else "valid",
                            steps=task.steps_range(cfg.toy_steps))
    table += "\n\n" + split_table(results, [task.has_gap(r["prompt"][0]["content"]) for r in problems],
                                   ("problems in the gap notation", "the others"))
    table += "\n\n" + failure_table(results)
    if student_seeds:
        table += "\n\n" + turn_table([root / f"sod-student-s{s}" for s in student_seeds])
    if cfg.quick:
        table += "\n\n(--quick: a few steps per stage and a tiny evaluation; these numbers mean nothing)"
    check = json.loads((root / "sft-teacher-checked" / "check.json").read_text())
    if check["checks"]:
        accs = " -> ".join(f"{c['call_accuracy']:.3f}" for c in check["checks"])
        table += (f"\n\nthe teacher's check: {accs} of the tool calls of {stages.CHECK_CONVERSATIONS} validation "
                  f"conversations right (teacher-forced; {len(check['checks']) - 1} continuation(s) of its SFT)")
    (root / "results.md").write_text(table + "\n")
    (root / "results.json").write_text(json.dumps({"results": results, "timings_s": timings, "seeds": seeds,
                                                   "config": asdict(cfg), "student_budget": budget,
                                                   "teacher_check": check},
                                                  indent=2))
    print("\n" + table)
    print(f"\nevery student run had the same budget: {budget}")
    print(f"seconds per stage (stages that ran): {timings}")
    return results


if __name__ == "__main__":
    run_script(main, Config)
