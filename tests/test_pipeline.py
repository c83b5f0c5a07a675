"""The study's arithmetic (intervals, paired differences, the budget check, the divergence table) on numbers
whose answer is known, and one multi-seed run of the pipeline end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import presets, study

REPO = Path(__file__).resolve().parent.parent


def test_the_bootstrap_interval_holds_the_mean_and_narrows_with_more_problems():
    rng = np.random.default_rng(0)
    few = rng.random((5, 32))                                    # [seeds, problems] of per-problem scores
    many = rng.random((5, 1024))
    lo, hi = study.bootstrap_interval(few)
    assert lo < few.mean() < hi
    lo2, hi2 = study.bootstrap_interval(many)
    assert lo2 < many.mean() < hi2 and hi2 - lo2 < (hi - lo) / 3
    assert study.bootstrap_interval(np.full((5, 64), 0.25)) == (0.25, 0.25)   # nothing varies


def fake_results(per_seed: dict[str, list[float]], problems: int = 64) -> dict:
    """results[name][seed] as evaluate.py writes them, every problem of a seed at the same score."""
    return {f"student {name}": {s: {"per_problem_avg": [v] * problems} for s, v in enumerate(values)}
            for name, values in per_seed.items()}


def test_paired_differences_compare_runs_of_the_same_seed():
    # OPD is below GRPO on every seed by exactly 5 points, although the seeds' levels differ by 40
    results = fake_results({"SFT": [0.1, 0.3, 0.5], "GRPO": [0.2, 0.4, 0.6], "OPD": [0.15, 0.35, 0.55],
                            "SOD": [0.25, 0.45, 0.65]})
    table = study.study_tables(results, 16, [0, 1, 2])
    row = next(line for line in table.splitlines() if line.startswith("| OPD - GRPO"))
    assert row.startswith("| OPD - GRPO | -5.0 | [-5.0, -5.0] | -5.0 / -5.0 / -5.0 |")
    row = next(line for line in table.splitlines() if line.startswith("| SOD - OPD"))
    assert "+10.0 | [+10.0, +10.0]" in row
    sft = next(line for line in table.splitlines() if line.startswith("| SFT |"))
    assert sft.startswith("| SFT | 30.0 | 16.3 |")                   # mean and std over the seeds' means


def test_the_split_table_scores_each_part_of_the_problems_apart():
    # two seeds; the first 3 of 4 problems are in the gap notation
    results = {"student GRPO": {0: {"per_problem_avg": [0.0, 0.0, 0.5, 1.0]},
                                1: {"per_problem_avg": [0.5, 0.0, 0.5, 1.0]}}}
    table = study.split_table(results, [True, True, True, False], ("gap", "others"))
    assert "| model | gap: 3 (avg %) | others: 1 (avg %) |" in table
    assert "| student GRPO | 25.0 ± 8.3 | 100.0 ± 0.0 |" in table


def write_run(path: Path, start: str, **config):
    base = dict(steps=30, prompts_per_step=16, n_samples=8, lr=5e-5, mini_batches=4, ppo_epochs=1,
                max_response_tokens=320, temperature=1.0, top_p=1.0, tool_failure_rate=0.0, toy_steps="2-4",
                kl_coef=0.0, eval_every=10, eval_prompts=64, eval_n=4, model=start)
    (path / "final").mkdir(parents=True)
    (path / "run.json").write_text(json.dumps({"config": dict(base, **config)}))
    return str(path / "final")


def test_the_budget_check_refuses_a_run_with_another_budget_or_another_start(tmp_path):
    students = {"grpo": {0: write_run(tmp_path / "grpo-s0", "sft-s0")},
                "opd": {0: write_run(tmp_path / "opd-s0", "", student="sft-s0", lr=1e-4)}}
    assert study.same_budget(tmp_path, students)["lr"] == {"grpo": 5e-5, "opd": 1e-4}  # each method its own lr
    students["sod"] = {0: write_run(tmp_path / "sod-s0", "", student="sft-s0", steps=20)}
    with pytest.raises(SystemExit, match="same budget"):
        study.same_budget(tmp_path, students)
    students["sod"] = {0: write_run(tmp_path / "sod-s0-b", "", student="sft-s1")}
    with pytest.raises(SystemExit, match="different checkpoints"):
        study.same_budget(tmp_path, students)
    students["sod"] = {0: write_run(tmp_path / "sod-s0-c", "", student="sft-s0"),
                       1: write_run(tmp_path / "sod-s1", "", student="sft-s1", lr=1e-4)}
    students["grpo"][1] = write_run(tmp_path / "grpo-s1", "sft-s1")
    with pytest.raises(SystemExit, match="sod runs did not share one learning rate"):
        study.same_budget(tmp_path, students)


def test_the_student_learning_rates_are_one_per_method_or_one_for_all():
    assert presets.student_lrs("2e-4,3e-4,2.5e-4") == {"grpo": 2e-4, "opd": 3e-4, "sod": 2.5e-4}
    assert presets.student_lrs("1e-4") == {"grpo": 1e-4, "opd": 1e-4, "sod": 1e-4}
    for bad in ("2e-4,3e-4", "fast", "2e-4,,3e-4", "0", "-1e-4"):
        with pytest.raises(SystemExit, match="--student_rl_lr"):
            presets.student_lrs(bad)


def test_the_divergence_table_sorts_each_turn_by_what_came_before_it(tmp_path):
    run = tmp_path / "sod-student-s0"
    run.mkdir()
    # a clean first call, a call the sandbox failed, its retry, a call whose code raised, a turn after it
    turns = [
        dict(step=1, d=0.1, w=1.0, tool_status="ok", after_tool_error=False, previous_failure=None),
        dict(step=2, d=0.2, w=0.5, tool_status="error", after_tool_error=False, previous_failure=None),
        dict(step=3, d=1.0, w=0.1, tool_status="ok", after_tool_error=True, previous_failure="sandbox"),
        dict(step=4, d=3.0, w=0.05, tool_status="error", after_tool_error=True, previous_failure=None),
        dict(step=5, d=2.0, w=0.04, tool_status="ok", after_tool_error=True, previous_failure="code"),
        dict(step=2, d=0.4, w=0.3, tool_status="ok", after_tool_error=False)]   # another trajectory
    (run / "steps.jsonl").write_text("".join(json.dumps(t) + "\n" for t in turns))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in
            study.turn_table([run]).splitlines()[2:]}
    assert rows["the first turn"] == ["1", "0.10", "1.00 |"]
    assert rows["later turns, no failed tool call before them"] == ["2", "0.30", "0.40 |"]
    assert rows["turns after a failed tool call"] == ["3", "2.00", "0.06 |"]
    assert rows["of which right after a failure of the sandbox"] == ["1", "1.00", "0.10 |"]
    assert rows["of which right after an error of the model's code"] == ["1", "2.00", "0.04 |"]
    assert rows["the failing turn itself"] == ["2", "1.60", "0.28 |"]
    (run / "steps.jsonl").write_text(json.dumps(turns[0]) + "\n")   # a kind with no turn shows a dash
    assert "| the failing turn itself | 0 | - | - |" in study.turn_table([run])


def test_a_two_seed_pipeline_prints_the_study_tables_and_draws_the_study(tmp_path):
    out = subprocess.run([sys.executable, "pipeline.py", "--quick", "--seeds", "0,1", "--seed_student_sft",
                          "--student_rl_lr", "1e-4,2e-4,3e-4", "--out_root", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    for row in ("| student SFT |", "| SOD - OPD |", "| OPD - GRPO |", "| the first turn |"):
        assert row in out.stdout
    assert (tmp_path / "sft-student-s0").is_dir() and (tmp_path / "sft-student-s1").is_dir()
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["seeds"] == [0, 1] and saved["student_budget"]["steps"] == 2
    assert saved["student_budget"]["lr"] == {"grpo": 1e-4, "opd": 2e-4, "sod": 3e-4}  # read from each run.json
    pytest.importorskip("matplotlib")
    assert (tmp_path / "study.png").stat().st_size > 10_000


def test_the_teacher_alone_with_its_own_seed_and_the_kernels_it_ran_on(tmp_path):
    # --teacher_only: the teacher's SFT and GRPO with --teacher_seed, evaluated, and nothing of the student
    flags = ["--quick", "--teacher_only", "--teacher_seed", "3", "--teacher_retry_frac", "0.3"]
    out = subprocess.run([sys.executable, "pipeline.py", *flags, "--out_root", str(tmp_path)], cwd=REPO,
                         capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, OMP_NUM_THREADS="1", SOD_CPU_KERNELS="avx2"))
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "| teacher GRPO |" in out.stdout and "| student" not in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["eval", "grpo-teacher", "sft-teacher",
                                                                        "sft-teacher-checked"]
    # --quick checks nothing (three SFT steps pass no check); the teacher's GRPO starts from the SFT's own weights
    assert json.loads((tmp_path / "sft-teacher-checked" / "check.json").read_text())["checks"] == []
    assert ((tmp_path / "sft-teacher-checked" / "model.safetensors").read_bytes()
            == (tmp_path / "sft-teacher" / "final" / "model.safetensors").read_bytes())
    assert json.loads((tmp_path / "grpo-teacher" / "run.json").read_text())["config"]["model"].endswith(
        "sft-teacher-checked")
    for stage in ("sft-teacher", "grpo-teacher"):
        record = json.loads((tmp_path / stage / "run.json").read_text())
        assert record["config"]["seed"] == 3
        assert record["cpu_kernels"].startswith("avx2 (ATen ")
    assert json.loads((tmp_path / "sft-teacher" / "run.json").read_text())["config"]["toy_retry_frac"] == 0.3
    # the teacher checks report the teacher's validation accuracy before and after its GRPO
    rows = [json.loads(x) for x in (tmp_path / "grpo-teacher" / "metrics.jsonl").read_text().splitlines()]
    assert "eval/toy/avg@2" in rows[0] and "eval/toy/avg@2" in rows[-1]
    # a stage made on other kernels is not reused
    again = subprocess.run([sys.executable, "pipeline.py", *flags, "--out_root", str(tmp_path)], cwd=REPO,
                           capture_output=True, text=True, timeout=900,
                           env=dict(os.environ, OMP_NUM_THREADS="1", SOD_CPU_KERNELS="native"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "=== sft teacher: running again, the CPU kernels changed" in again.stdout


def test_two_stages_at_a_time_make_the_rl_checkpoints_and_table_of_one_at_a_time_at_one_thread(tmp_path):
    # OMP_NUM_THREADS=1: one stage after another, at one thread. Two threads: the SFT stages alone at two
    # threads, then two stages at a time at one thread each. Given the same SFT checkpoints, every later stage
    # runs at one thread in both, so its bits are the same on any CPU. (Whether the SFT stages themselves train
    # to the same bits at two threads as at one depends on the CPU's kernels: docs/results.md.)
    sft_stages = ["sft-teacher", "sft-student"]
    rl_stages = ["grpo-teacher", "grpo-student-s0", "opd-student-s0", "sod-student-s0"]
    made = {}
    for threads, workers in (("1", 1), ("2", 2)):
        root = tmp_path / f"threads-{threads}"
        if threads == "2":   # the one-thread run's SFT stages, reused (same settings, inputs and code)
            for stage in sft_stages:
                shutil.copytree(tmp_path / "threads-1" / stage, root / stage)
        out = subprocess.run([sys.executable, "pipeline.py", "--quick", "--out_root", str(root)], cwd=REPO,
                             capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, OMP_NUM_THREADS=threads))
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
        assert f"{workers} at a time" in out.stdout
        scores = {model: {seed: {k: v for k, v in r.items() if k != "seconds"} for seed, r in by_seed.items()}
                  for model, by_seed in json.loads((root / "results.json").read_text())["results"].items()}
        made[threads] = ({s: (root / s / "final" / "model.safetensors").read_bytes() for s in rl_stages},
                         scores, out.stdout)
    assert all(f"=== {s.replace('-', ' ')}: reused" in made["2"][2] for s in sft_stages)
    assert made["2"][0] == made["1"][0]
    assert made["2"][1] == made["1"][1]  # every score of the table, all but the evaluations' seconds
    assert (tmp_path / "threads-2" / "grpo-teacher" / "stage.log").read_text().strip()  # each stage's own log
    # the default evaluates every model once, in the final table, and no RL run on the validation split
    for stage in rl_stages:
        rows = (tmp_path / "threads-2" / stage / "metrics.jsonl").read_text().splitlines()
        assert len(rows) == 2 and not any("eval/" in row for row in rows)


def test_a_teacher_that_fails_its_check_trains_on_twice_and_then_stops_the_pipeline(tmp_path):
    # three SFT steps write no call right: the check asks for more epochs (from the last weights, at the lower
    # learning rate), twice, then stops before any GRPO, saying what to do
    out = subprocess.run([sys.executable, "pipeline.py", "--quick", "--teacher_only", "--teacher_min_call_acc",
                          "0.5", "--out_root", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, OMP_NUM_THREADS="1"))
    said = out.stdout + out.stderr
    assert out.returncode != 0
    assert "the teacher's SFT writes only 0.000 of its tool calls right after 2 continuations" in said
    assert "--teacher_min_call_acc 0 goes on with it anyway" in said
    assert not (tmp_path / "grpo-teacher").exists() and not (tmp_path / "sft-teacher-checked").exists()
    for k, start in ((1, tmp_path / "sft-teacher" / "final"), (2, tmp_path / "sft-teacher-more1" / "final")):
        config = json.loads((tmp_path / f"sft-teacher-more{k}" / "run.json").read_text())["config"]
        assert config["model"] == str(start) and config["epochs"] == 2 and config["lr"] == 1e-3
        assert config["toy_direct_frac"] == 0.5 and config["seed"] == 0  # the same data as the SFT's
