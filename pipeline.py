"""
pipeline.py: the whole toy pipeline in one command, ending with the paper's comparison table.

    1. SFT the toy teacher (clean tool use, half direct answers)   sft.py  -> runs/sft-teacher
       and check its tool calls (a few more epochs if it copies     sft.py  -> runs/sft-teacher-checked
       them wrong)
    2. SFT the toy student on trajectories that include recoveries  sft.py  -> runs/sft-student
    3. GRPO the teacher with the tool                              grpo.py -> runs/grpo-teacher
    4. the student with the same RL budget, three ways (10 steps each by default):
         GRPO alone                                                grpo.py        -> runs/grpo-student-s0
         GRPO + uniform on-policy distillation (OPD)               sod_distill.py -> runs/opd-student-s0
         GRPO + step-wise on-policy distillation (SOD)             sod_distill.py -> runs/sod-student-s0
    5. evaluate every model on the held-out toy test split         evaluate.py    -> runs/eval

Every stage is the stage file's own `main` with its own config: this file only chooses the sizes.

On two cores the stages run two at a time (--workers), each in a process of its own at one thread, with its
output in its folder's stage.log: the toy's stages lose less to the second thread than they gain from a second
stage beside them (common/jobs.py). The teacher's SFT, which loses most, runs alone with both threads (on the
AMD EPYC of docs/results.md it trains to the same bits at one thread and at two; on an Intel Xeon with AVX-512 it
does not). Every other stage runs at one thread, as it would with OMP_NUM_THREADS=1, so from the same SFT
checkpoints the weights are the same as OMP_NUM_THREADS=1's on any CPU. --workers 1 runs the stages one after
another in this process, at every thread: there, at two threads, a rollout's sampled tokens can differ from
one thread's (torch's CPU attention kernel for one generated token rounds by thread count; docs/results.md).
RL runs are evaluated once, in the final table (--rl_validation: none); the teacher checks (--teacher_only)
also evaluate the teacher on the validation split before and after its GRPO, and the study every RL run.

Three presets. The default is a short run (one seed, the teacher's GRPO 30 steps and each student's RL 10, about 14
min on 2 cores). --quick runs every stage for a handful of steps (a smoke test whose numbers mean nothing). --study
asks the paper's question, a weak student and a strong teacher: the same task with a tool call failing now and then
(3%), a teacher that never retries a failed call, a student whose cold-start data answers most problems without the
tool and retries failed calls, five seeds (each with its own student SFT), 256 test problems x 16 samples, a table
with bootstrap confidence intervals and paired differences, the step divergences of the SOD students, and a picture
of validation accuracy against RL step (runs-study/study.png). Any flag given explicitly overrides its preset
value.

A stage's output is reused only when it was made by the same settings, from the same inputs (the weights of
the checkpoints it starts from) and by the same code; a stage that was interrupted resumes from its last
checkpoint; anything else reruns. Each stage says which of the three happened.

    python pipeline.py                 # the short default
    python pipeline.py --quick         # the smoke test
    python pipeline.py --study         # weak student, strong teacher, five seeds
    python pipeline.py --teacher_only --teacher_seed 1 --out_root runs-teacher-s1   # the teacher's stages alone
"""
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import evaluate
import grpo
import sft
import sod_distill
import tools
from common import cpu_kernels, jobs, models, runs, sandbox
from common.cli import arg, quiet_libraries, run_script
from common.study import failure_table, plot_study, results_table, same_budget, study_tables, turn_table
from toy import task

log = logging.getLogger("pipeline")
UNSET, UNSET_FRACTION = -1, -1.0  # a numeric flag left to the preset


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
    student_direct_frac: float = arg(UNSET_FRACTION, "fraction of the student's SFT data answered at once, "
                                                     "without the tool (-1: the preset's)")
    max_response_tokens: int = arg(UNSET, "tokens per trajectory, tool tokens included, in RL and evaluation "
                                          "(-1: the preset's)")
    rl_steps: int = arg(UNSET, "RL steps of each student run, GRPO, OPD and SOD alike (-1: the preset's)")
    teacher_rl_steps: int = arg(UNSET, "RL steps of the teacher's GRPO (-1: the preset's)")
    student_rl_lr: float = arg(UNSET_FRACTION, "learning rate of every student RL run, GRPO, OPD and SOD alike "
                                               "(-1: the preset's)")
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


PRESETS = {  # every field the presets set; a flag given explicitly wins
    "default": dict(out_root="runs", seeds="0", seed_student_sft=False, toy_steps="2-4",
                    tool_failure_rate=0.0, teacher_model="toy-teacher", teacher_sft_epochs=5,
                    teacher_direct_frac=0.5, teacher_retry_frac=0.0, teacher_min_call_acc=0.98,
                    teacher_more_epochs=2, teacher_more_lr=1e-3, sft_micro_batch_size=16, student_sft_epochs=4,
                    student_sft_examples=5000,
                    student_recovery_frac=0.25, student_retry_frac=0.0, student_direct_frac=0.0,
                    max_response_tokens=320, teacher_rl_steps=30,
                    rl_steps=10, student_rl_lr=5e-5,  # the students' RL: 10 steps keep the run under 15 minutes
                    rl_validation="none", rl_eval_every=0, rl_eval_prompts=64, rl_eval_n=4, eval_n=8,
                    eval_prompts=128),
    "quick": dict(rl_steps=2, teacher_rl_steps=2, eval_n=2, eval_prompts=4,
                  teacher_min_call_acc=0.0),  # three SFT steps pass no check
    # a weak student and a strong teacher (docs/results.md, "The study"): a flaky tool that the student's data
    # retries and the teacher's does not; a student whose data answers 55% of its problems at once, without the
    # tool (11,000 conversations, so that about as many use the tool as the default student's 5,000). Its
    # teacher, its unsorted SFT batches and its validation curve every 10 steps are those its tables were made
    # with, and its students' RL, 30 steps.
    "study": dict(out_root="runs-study", seeds="0,1,2,3,4", seed_student_sft=True, tool_failure_rate=0.03,
                  teacher_model="toy-teacher-small", sft_micro_batch_size=32, rl_steps=30, rl_validation="all",
                  rl_eval_every=10, rl_eval_prompts=128, student_direct_frac=0.55, student_sft_examples=11000,
                  student_retry_frac=0.3, eval_n=16, eval_prompts=256),
}


def resolve(cfg: Config) -> Config:
    """The preset's value for every field left unset (UNSET, or an empty string)."""
    if cfg.quick and cfg.study:
        raise SystemExit("--quick and --study are two different presets: choose one")
    if cfg.eval_split not in ("test", "valid"):  # checked before any stage trains, not after
        raise SystemExit(f"--eval_split must be test or valid, not {cfg.eval_split!r}")
    if cfg.rl_validation not in ("", "none", "teacher", "all"):
        raise SystemExit(f"--rl_validation must be none, teacher or all, not {cfg.rl_validation!r}")
    preset = dict(PRESETS["default"],
                  **(PRESETS["quick"] if cfg.quick else PRESETS["study"] if cfg.study else {}))
    unset = {f.name: preset[f.name] for f in fields(cfg)
             if f.name in preset and getattr(cfg, f.name) in (UNSET, UNSET_FRACTION, "")
             and not isinstance(getattr(cfg, f.name), bool)}
    flags = {k: True for k in ("seed_student_sft",) if preset[k] and not getattr(cfg, k)}
    if cfg.teacher_only and not cfg.rl_validation:  # the teacher checks report validation before and after GRPO
        unset["rl_validation"] = "teacher"
    resolved = replace(cfg, **unset, **flags)
    given = [f"--{k}" for k in ("rl_eval_every", "rl_eval_prompts", "rl_eval_n") if getattr(cfg, k) != UNSET]
    if resolved.rl_validation == "none" and given:
        raise SystemExit(f"{', '.join(given)}: no RL run evaluates on the validation split "
                         f"(--rl_validation none); add --rl_validation teacher or all")
    return resolved


# -----------------------------------------------------------------------------
# Stages that know where they come from

def fingerprint(stage_cfg, inputs: list[str]) -> dict:
    """What a stage's output depends on: its settings (minus where it writes and whether it resumes), the
    weights of the checkpoints it starts from, and the code."""
    settings = {k: v for k, v in asdict(stage_cfg).items() if k not in ("out_dir", "resume", "device")}
    weights = {}
    for path in inputs:
        f = Path(path) / "model.safetensors"
        weights[path] = hashlib.sha256(f.read_bytes()).hexdigest()[:16] if f.exists() else path
    return {"settings": settings, "inputs": weights, "code_version": runs.code_version(),
            "cpu_kernels": cpu_kernels.describe()}


def run_stage(name: str, out_dir: Path, fn, stage_cfg, inputs: list[str]) -> dict:
    """Reuse out_dir/final if the same settings, inputs and code made it; resume an interrupted run of the
    same stage; otherwise run it from the start (the stage itself clears what an earlier run left). Returns
    what happened and, when the stage ran, its seconds."""
    want = fingerprint(stage_cfg, inputs)
    record = out_dir / "pipeline_stage.json"
    had = json.loads(record.read_text()) if record.exists() else None
    print(f"\n=== {name} -> {out_dir}")
    if had == want and (out_dir / "final" / "config.json").exists():
        what = "reused (made by the same settings, inputs and code)"
        print(f"=== {name}: {what}")
        return dict(what=what, seconds=None)
    what = "ran"
    if had == want and runs.latest_checkpoint(out_dir) is not None:
        what = f"resuming from {runs.latest_checkpoint(out_dir).name}"
        stage_cfg.resume = True
    elif had is not None:
        before, now = had["settings"], want["settings"]
        changed = ", ".join(f"{k}: {before.get(k)} -> {now[k]}" for k in now if before.get(k) != now[k])
        why = (f"settings changed ({changed})" if changed else
               "its inputs changed" if had["inputs"] != want["inputs"] else
               "the CPU kernels changed" if had.get("cpu_kernels") != want["cpu_kernels"] else "the code changed")
        what = f"running again, {why}"
    if what != "ran":
        print(f"=== {name}: {what}")
    out_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(want, indent=1, default=str) + "\n")
    t0 = time.time()
    fn(stage_cfg)
    seconds = round(time.time() - t0, 1)
    print(f"=== {name}: {seconds:.0f} s")
    return dict(what=what, seconds=seconds)


CHECK_CONVERSATIONS, MAX_MORE = 256, 2  # the teacher's check: validation conversations; continuations at most


def sft_teacher_checked(root: Path, stage_cfg, min_call_acc: float, more_epochs: int, more_lr: float) -> dict:
    """The teacher's SFT, then its check: does it write the tool calls of solved validation conversations
    right? A teacher that has not learned to copy one part of the problem (one operator, or the constant of
    one line) gets it right only by chance, and thirty GRPO steps do not teach it (docs/results.md, "The
    teacher's check"). Below --teacher_min_call_acc the SFT goes on from its last weights for a few more
    epochs at a lower peak learning rate, with the same data, at most MAX_MORE times; if the teacher still
    falls short the pipeline stops. A teacher that passes at once is the SFT's own output, untouched. Either
    way the checkpoint the teacher's GRPO starts from is copied to sft-teacher-checked/, with check.json."""
    result = run_stage("sft teacher", root / "sft-teacher", sft.main, stage_cfg, [])
    seconds, what = result["seconds"], [result["what"]]
    start, checks = root / "sft-teacher" / "final", []
    held_out = task.held_out_conversations(CHECK_CONVERSATIONS, task.steps_range(stage_cfg.toy_steps))
    for more in range(MAX_MORE + 1 if min_call_acc > 0 else 0):  # 0: no check, the SFT's own weights
        model = models.load_model(str(start), device="cpu")
        acc = sft.call_accuracy(model, models.load_tokenizer(str(start)), held_out, [tools.TOOL_SCHEMA])
        checks.append({"checkpoint": str(start), "call_accuracy": acc})
        print(f"=== the teacher's check: {acc:.3f} of the tool calls of {len(held_out)} validation "
              f"conversations right (teacher-forced), {'at or above' if acc >= min_call_acc else 'below'} "
              f"{min_call_acc}")
        if acc >= min_call_acc:
            break
        if more == MAX_MORE:
            raise SystemExit(f"the teacher's SFT writes only {acc:.3f} of its tool calls right after {MAX_MORE} "
                             f"continuations (needs {min_call_acc}): a teacher this weak would teach its "
                             f"mistakes. Try another --teacher_seed or --teacher_model; --teacher_min_call_acc 0 "
                             f"goes on with it anyway")
        out = root / f"sft-teacher-more{more + 1}"
        part = run_stage(f"sft teacher, {more_epochs} more epochs ({more + 1})", out, sft.main,
                         replace(stage_cfg, model=str(start), epochs=more_epochs, lr=more_lr, out_dir=str(out)),
                         [str(start)])
        if part["seconds"] is not None:  # None: reused
            seconds = (seconds or 0.0) + part["seconds"]
        what.append(f"{more_epochs} more epochs: {part['what']}")
        start = out / "final"
    checked = root / "sft-teacher-checked"  # a copy, made whole before it replaces the last one
    tmp = root / "sft-teacher-checked.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(start, tmp)
    (tmp / "check.json").write_text(json.dumps({"min_call_acc": min_call_acc, "checks": checks,
                                                "start_of_grpo": str(start)}, indent=1) + "\n")
    shutil.rmtree(checked, ignore_errors=True)
    os.replace(tmp, checked)
    return dict(what="; ".join(what), seconds=seconds)


def evaluate_model(name: str, path: str, eval_cfg, cache_dir: Path) -> dict:
    """Test-split metrics of one checkpoint, reused when the same weights were evaluated the same way."""
    want = fingerprint(eval_cfg, [path])
    cache = cache_dir / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".json")
    if cache.exists() and json.loads(cache.read_text())["fingerprint"] == want:
        print(f"  {name}: reused the evaluation of {path}")
        return dict(results=json.loads(cache.read_text())["results"], what="reused", seconds=None)
    t0 = time.time()
    tokenizer = models.load_tokenizer(path)
    results = evaluate.evaluate_engine(models.load_model(path, device="cpu"), tokenizer,
                                       evaluate.load_benchmarks(eval_cfg), eval_cfg)["toy"]
    cache.write_text(json.dumps({"fingerprint": want, "results": results}, indent=1, default=str))
    seconds = round(time.time() - t0, 1)
    print(f"  {name}: evaluated {path} in {seconds:.0f} s")
    return dict(results=results, what="evaluated", seconds=seconds)


def setup_child(sandbox_kind: str, sandbox_python: str):
    """What `python pipeline.py` sets up before its stages, done again in each stage's own process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_libraries()
    cpu_kernels.configure(cpu_kernels.mode_from_env())  # the parent's pins are in the environment it inherits
    sandbox.configure(sandbox_kind, python=sandbox_python)


# -----------------------------------------------------------------------------

def main(cfg: Config):
    cfg = resolve(cfg)
    # every stage's tool calls, SFT's final greedy check included
    sandbox.configure(cfg.sandbox, python=cfg.sandbox_python)
    root = Path(cfg.out_root)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    student_seeds = [] if cfg.teacher_only else seeds  # --teacher_only: no student stage, row or table
    sft_sizes = dict(max_steps=3, toy_examples=64, eval_prompts=0) if cfg.quick else {}
    # below the batch size, each SFT batch is sorted by length before it is cut into micro-batches (sft.py)
    sft_sizes.update(micro_batch_size=cfg.sft_micro_batch_size,
                     sort_by_length=cfg.sft_micro_batch_size < sft.Config.batch_size)
    rl_sizes = dict(eval_every=cfg.rl_eval_every, eval_prompts=cfg.rl_eval_prompts,
                    eval_n=cfg.rl_eval_n, tool_failure_rate=cfg.tool_failure_rate, toy_steps=cfg.toy_steps,
                    max_response_tokens=cfg.max_response_tokens, sandbox=cfg.sandbox,
                    sandbox_python=cfg.sandbox_python)
    if cfg.quick:
        rl_sizes.update(prompts_per_step=2, n_samples=4, eval_prompts=4, eval_n=2)

    def validated(sizes: dict, on: bool) -> dict:  # off: the run evaluates nothing (grpo.py --eval_every -1)
        return sizes if on else dict({k: v for k, v in sizes.items() if k not in ("eval_prompts", "eval_n")},
                                     eval_every=-1)

    # Every stage and every evaluation is a job; a job lists the jobs whose checkpoints it starts from. They run
    # one after another, or side by side (--workers), in this order of priority: the teacher's chain is the
    # longest, so it goes first.
    plan = []

    def stage(name, out, fn, stage_cfg, inputs, after=(), alone=False):
        plan.append(jobs.Job(name, run_stage, (name, out, fn, stage_cfg, inputs), out / "stage.log", list(after),
                             alone=alone))

    # 1-2. cold-start SFT. The teacher sees clean tool solutions (and, by default, answers given at once
    # without the tool, which its GRPO unlearns); the student's data also shows recoveries from failed tool
    # calls and retries after transient failures, which the teacher never sees: where SOD's step weights
    # matter.
    # The teacher's SFT is checked before its GRPO: see sft_teacher_checked.
    teacher_sft = str(root / "sft-teacher-checked")
    teacher_sft_cfg = sft.Config(model=cfg.teacher_model, toy_recovery_frac=0.0,
                                 toy_direct_frac=cfg.teacher_direct_frac, toy_retry_frac=cfg.teacher_retry_frac,
                                 toy_steps=cfg.toy_steps, epochs=cfg.teacher_sft_epochs, seed=cfg.teacher_seed,
                                 out_dir=str(root / "sft-teacher"), **sft_sizes)
    plan.append(jobs.Job("sft teacher", sft_teacher_checked, (root, teacher_sft_cfg, cfg.teacher_min_call_acc,
                                                              cfg.teacher_more_epochs, cfg.teacher_more_lr),
                         root / "sft-teacher" / "stage.log",
                         alone=True))  # with every thread: one thread slows it down most (common/jobs.py)
    # 3. the teacher's RL
    teacher = str(root / "grpo-teacher" / "final")
    stage("grpo teacher", root / "grpo-teacher", grpo.main,
          grpo.Config(model=teacher_sft, out_dir=str(root / "grpo-teacher"), seed=cfg.teacher_seed,
                      steps=cfg.teacher_rl_steps, **validated(rl_sizes, cfg.rl_validation != "none")),
          [teacher_sft], after=["sft teacher"])
    student_sfts = {}  # seed -> (checkpoint, the job that makes it)
    for seed in (student_seeds if cfg.seed_student_sft else student_seeds[:1]):
        out = root / (f"sft-student-s{seed}" if cfg.seed_student_sft else "sft-student")
        name = f"sft student (seed {seed})" if cfg.seed_student_sft else "sft student"
        stage(name, out, sft.main,
              sft.Config(model="toy-student", epochs=cfg.student_sft_epochs,
                         toy_recovery_frac=cfg.student_recovery_frac, toy_retry_frac=cfg.student_retry_frac,
                         toy_direct_frac=cfg.student_direct_frac, toy_steps=cfg.toy_steps, seed=seed,
                         out_dir=str(out), **{"toy_examples": cfg.student_sft_examples, **sft_sizes}), [])
        student_sfts[seed] = (str(out / "final"), name)
    # 4. the student, same budget three ways
    students = {}
    for seed in student_seeds:
        start, start_job = student_sfts.get(seed, student_sfts[seeds[0]])
        student_rl = dict(validated(rl_sizes, cfg.rl_validation == "all"), steps=cfg.rl_steps,
                          lr=cfg.student_rl_lr)
        for method in ("grpo", "opd", "sod"):
            out = root / f"{method}-student-s{seed}"
            if method == "grpo":
                stage(f"{method} student (seed {seed})", out, grpo.main,
                      grpo.Config(model=start, out_dir=str(out), seed=seed, **student_rl), [start],
                      after=[start_job])
            else:
                stage(f"{method} student (seed {seed})", out, sod_distill.main,
                      sod_distill.Config(student=start, teacher=teacher, mode=method, out_dir=str(out), seed=seed,
                                         **student_rl), [start, teacher], after=[start_job, "grpo teacher"])
            students.setdefault(method, {})[seed] = (str(out / "final"), f"{method} student (seed {seed})")
    # 5. one evaluation on the test split, same settings for every model
    eval_cfg = evaluate.Config(model=[], data="toy" if cfg.eval_split == "test" else "toy:valid",
                               num_prompts=cfg.eval_prompts, n_samples=cfg.eval_n, toy_steps=cfg.toy_steps,
                               max_response_tokens=cfg.max_response_tokens,
                               tool_failure_rate=cfg.tool_failure_rate, sandbox=cfg.sandbox,
                               sandbox_python=cfg.sandbox_python,
                               out_dir=str(root / "eval"), seed=1234)
    (root / "eval").mkdir(parents=True, exist_ok=True)
    evaluated = [("teacher SFT", None, teacher_sft, "sft teacher"),
                 ("teacher GRPO", None, teacher, "grpo teacher")]
    evaluated += [("student SFT", s, *student_sfts.get(s, student_sfts[seeds[0]])) for s in student_seeds]
    evaluated += [(f"student {m.upper()}", s, path, job) for m, by_seed in students.items()
                  for s, (path, job) in by_seed.items()]
    for name, seed, path, job in evaluated:
        label = name if seed is None else f"{name} (seed {seed})"
        log_name = label.replace(" ", "_").replace("(", "").replace(")", "")
        plan.append(jobs.Job(f"evaluate {label}", evaluate_model, (label, path, eval_cfg, root / "eval"),
                             root / "eval" / f"{log_name}.log", [job]))

    print(f"the final table: {cfg.eval_prompts} {cfg.eval_split} problems x {cfg.eval_n} samples "
          f"-> {root / 'eval'}")
    t_start, threads = time.time(), torch.get_num_threads()
    workers = cfg.workers or (1 if cfg.teacher_only else min(2, threads))  # the teacher alone: one chain
    print(f"{len(plan)} jobs, {workers} at a time" + (f", {max(1, threads // workers)} thread(s) each"
                                                     if workers > 1 else ""))
    timings, t_eval = {}, 0.0

    def done(job, result, seconds):
        nonlocal t_eval
        if result["seconds"] is not None and not job.name.startswith("evaluate "):
            timings[job.name] = result["seconds"]
        if job.name.startswith("evaluate "):
            t_eval += result["seconds"] or 0.0
        if workers > 1:
            print(f"=== {job.name}: {result['what']} ({seconds:.0f} s)", flush=True)

    finished = jobs.run(plan, workers, max(1, threads // workers), setup=setup_child,
                        setup_args=(cfg.sandbox, cfg.sandbox_python), on_done=done)
    timings["evaluation"] = round(t_eval, 1)  # the evaluations' own seconds, added up
    timings["wall clock"] = round(time.time() - t_start, 1)
    results = {}
    for name, seed, path, job in evaluated:
        label = name if seed is None else f"{name} (seed {seed})"
        results.setdefault(name, {})[seed] = finished[f"evaluate {label}"]["results"]
    students = {m: {s: path for s, (path, _) in by_seed.items()} for m, by_seed in students.items()}
    budget = same_budget(root, students) if students else {}  # refuses runs that did not share one budget
    table = results_table(results, cfg.eval_n)
    if len(student_seeds) > 1:
        table += "\n\n" + study_tables(results, cfg.eval_n, student_seeds)
        plot_study(root, student_seeds, root / "study.png")
    table += "\n\n" + failure_table(results)
    if student_seeds:
        table += "\n\n" + turn_table([root / f"sod-student-s{s}" for s in student_seeds])
    if cfg.quick:
        table += "\n\n(--quick: a few steps per stage and a tiny evaluation; these numbers mean nothing)"
    check = json.loads((root / "sft-teacher-checked" / "check.json").read_text())
    if check["checks"]:
        accs = " -> ".join(f"{c['call_accuracy']:.3f}" for c in check["checks"])
        table += (f"\n\nthe teacher's check: {accs} of the tool calls of {CHECK_CONVERSATIONS} validation "
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
