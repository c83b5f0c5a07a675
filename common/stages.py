"""
common/stages.py: a pipeline's stages that know where they come from, so that each is reused, resumed or run
again, and says which.

A stage's output is reused only when it was made by the same settings, from the same inputs (the weights of the
checkpoints it starts from), by the same code and on the same CPU kernels: its `fingerprint`, written beside
the output as pipeline_stage.json before the stage starts. A stage whose fingerprint matches but that has no
final checkpoint was interrupted: it resumes from its last one. Anything else runs again from the start (the
stage itself clears what an earlier run left), saying what changed. An evaluation is kept the same way, keyed
by the weights it evaluated. And one stage is checked before the next starts from it: the teacher's SFT, which
goes on for a few more epochs while it writes its tool calls wrong (`sft_teacher_checked`).

common/ imports no stage: each function here is given the stage's code (`sft.main`, an evaluation) as an
argument. Every function that a job runs is a module-level one, so that it can travel to the job's own process
(common/jobs.py).
"""
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, NamedTuple

from common import cpu_kernels, jobs, runs, sandbox
from common.cli import quiet_libraries


class StageResult(NamedTuple):
    """What a job of the pipeline sends back."""
    what: str                    # "ran", "reused (...)", "resuming from checkpoint-2", "running again, ..."
    seconds: float | None        # the stage's own seconds; None: reused
    results: dict | None = None  # an evaluation's metrics


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


def run_stage(name: str, out_dir: Path, fn: Callable, stage_cfg, inputs: list[str]) -> StageResult:
    """Reuse out_dir/final if the same settings, inputs and code made it; resume an interrupted run of the
    same stage; otherwise run fn(stage_cfg) from the start."""
    want = fingerprint(stage_cfg, inputs)
    record = out_dir / "pipeline_stage.json"
    had = json.loads(record.read_text()) if record.exists() else None
    print(f"\n=== {name} -> {out_dir}")
    if had == want and (out_dir / "final" / "config.json").exists():
        what = "reused (made by the same settings, inputs and code)"
        print(f"=== {name}: {what}")
        return StageResult(what, None)
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
    return StageResult(what, seconds)


def stage_job(name: str, out_dir: Path, fn: Callable, stage_cfg, inputs: list[str], after=(),
              alone=False) -> jobs.Job:
    """A job that runs one stage through run_stage, its output in out_dir/stage.log. `inputs`: the checkpoints
    it starts from; `after`: the jobs that make them."""
    return jobs.Job(name, run_stage, (name, out_dir, fn, stage_cfg, inputs), out_dir / "stage.log", list(after),
                    alone=alone)


# -----------------------------------------------------------------------------
# The teacher's SFT, checked before its GRPO starts from it

CHECK_CONVERSATIONS, MAX_MORE = 256, 2  # the teacher's check: validation conversations; continuations at most


def sft_teacher_checked(root: Path, stage_cfg, min_call_acc: float, more_epochs: int, more_lr: float,
                        train: Callable, call_accuracy: Callable) -> StageResult:
    """The teacher's SFT, train(stage_cfg) (sft.main), then its check: does it write the tool calls of solved
    validation conversations right? call_accuracy(checkpoint, toy_steps) is that fraction over
    CHECK_CONVERSATIONS of them, teacher-forced (sft.call_accuracy). A teacher that has not learned to copy
    one part of the problem (one operator, or the constant of one line) gets it right only by chance, and
    thirty GRPO steps do not teach it (docs/results.md, "The teacher's check"). Below min_call_acc the SFT
    goes on from its last weights for more_epochs at the lower peak learning rate more_lr, with the same data,
    at most MAX_MORE times; if the teacher still falls short the pipeline stops. A teacher that passes at once
    is the SFT's own output, untouched. Either way the checkpoint the teacher's GRPO starts from is copied to
    sft-teacher-checked/, with check.json."""
    result = run_stage("sft teacher", root / "sft-teacher", train, stage_cfg, [])
    seconds, what = result.seconds, [result.what]
    start, checks = root / "sft-teacher" / "final", []
    for more in range(MAX_MORE + 1 if min_call_acc > 0 else 0):  # 0: no check, the SFT's own weights
        acc = call_accuracy(str(start), stage_cfg.toy_steps)
        checks.append({"checkpoint": str(start), "call_accuracy": acc})
        print(f"=== the teacher's check: {acc:.3f} of the tool calls of {CHECK_CONVERSATIONS} validation "
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
        part = run_stage(f"sft teacher, {more_epochs} more epochs ({more + 1})", out, train,
                         replace(stage_cfg, model=str(start), epochs=more_epochs, lr=more_lr, out_dir=str(out)),
                         [str(start)])
        if part.seconds is not None:  # None: reused
            seconds = (seconds or 0.0) + part.seconds
        what.append(f"{more_epochs} more epochs: {part.what}")
        start = out / "final"
    checked = root / "sft-teacher-checked"  # a copy, made whole before it replaces the last one
    tmp = root / "sft-teacher-checked.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(start, tmp)
    (tmp / "check.json").write_text(json.dumps({"min_call_acc": min_call_acc, "checks": checks,
                                                "start_of_grpo": str(start)}, indent=1) + "\n")
    shutil.rmtree(checked, ignore_errors=True)
    os.replace(tmp, checked)
    return StageResult("; ".join(what), seconds)


# -----------------------------------------------------------------------------
# Evaluations, and what every job's process sets up

def file_name(label: str) -> str:
    """'student SOD (seed 0)' -> 'student_SOD_seed_0'"""
    return label.replace(" ", "_").replace("(", "").replace(")", "")


def evaluate_once(label: str, path: str, evaluate: Callable, eval_cfg, cache_dir: Path) -> StageResult:
    """evaluate(path, eval_cfg): one checkpoint's metrics, reused when the same weights were evaluated the same
    way (cache_dir/<label>.json)."""
    want = fingerprint(eval_cfg, [path])
    cache = cache_dir / (file_name(label) + ".json")
    if cache.exists() and json.loads(cache.read_text())["fingerprint"] == want:
        print(f"  {label}: reused the evaluation of {path}")
        return StageResult("reused", None, json.loads(cache.read_text())["results"])
    t0 = time.time()
    results = evaluate(path, eval_cfg)
    cache.write_text(json.dumps({"fingerprint": want, "results": results}, indent=1, default=str))
    seconds = round(time.time() - t0, 1)
    print(f"  {label}: evaluated {path} in {seconds:.0f} s")
    return StageResult("evaluated", seconds, results)


def evaluation_job(label: str, path: str, evaluate: Callable, eval_cfg, cache_dir: Path, after: str) -> jobs.Job:
    """A job that evaluates one checkpoint through evaluate_once, once the job `after` has made it."""
    return jobs.Job(f"evaluate {label}", evaluate_once, (label, path, evaluate, eval_cfg, cache_dir),
                    cache_dir / f"{file_name(label)}.log", [after])


def setup_process(sandbox_kind: str, sandbox_python: str):
    """What `python pipeline.py` sets up before its stages, done again in each job's own process."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    quiet_libraries()
    cpu_kernels.configure(cpu_kernels.mode_from_env())  # the parent's pins are in the environment it inherits
    sandbox.configure(sandbox_kind, python=sandbox_python)


def print_done(job: jobs.Job, result: StageResult, seconds: float):
    """jobs.run's on_done when stages run side by side: their own lines went to their logs."""
    print(f"=== {job.name}: {result.what} ({seconds:.0f} s)", flush=True)
