"""Every script runs end to end as a user runs it (a subprocess, a step or two, tiny sizes), cleanRL-style."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import sod_distill

REPO = Path(__file__).resolve().parent.parent


def run(*args, timeout=600):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """SFT checkpoints of the tiny teacher and student, made by sft.py itself."""
    root = tmp_path_factory.mktemp("runs")
    run("sft.py", "--model", "toy-teacher", "--max_steps", 2, "--toy_examples", 32, "--batch_size", 8,
        "--toy_recovery_frac", 0, "--out_dir", root / "sft-teacher", "--eval_prompts", 2)
    run("sft.py", "--max_steps", 2, "--toy_examples", 32, "--batch_size", 8,
        "--out_dir", root / "sft-student", "--eval_prompts", 0)
    for name in ("sft-teacher", "sft-student"):
        final = root / name / "final"
        assert (final / "model.safetensors").exists() and (final / "tokenizer.json").exists()
        assert (final / "chat_template.jinja").exists()
        assert len((root / name / "metrics.jsonl").read_text().splitlines()) == 2
    return root


RL_SMALL = ["--steps", 2, "--prompts_per_step", 2, "--n_samples", 2, "--eval_every", 0, "--eval_prompts", 2,
            "--eval_n", 2, "--max_response_tokens", 96, "--save_every", 1]


def test_grpo_script(runs):
    run("grpo.py", "--model", runs / "sft-teacher" / "final", "--out_dir", runs / "grpo-teacher", *RL_SMALL)
    rows = [json.loads(x) for x in (runs / "grpo-teacher" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the SFT checkpoint, evaluated before training
    assert "eval/toy/avg@2" in rows[0] and "reward" not in rows[0]
    assert ({"reward", "acc", "clip_frac", "approx_kl", "t_rollout", "t_tools", "tool_error_rate"}
            <= set(rows[1]))
    assert "eval/toy/avg@2" in rows[-1]
    assert (runs / "grpo-teacher" / "final" / "model.safetensors").exists()
    assert not (runs / "grpo-teacher" / "steps.jsonl").exists()  # per-turn records are SOD's, not GRPO's


def test_sod_script(runs):
    out = runs / "sod-student"
    run("sod_distill.py", "--student", runs / "sft-student" / "final",
        "--teacher", runs / "sft-teacher" / "final", "--out_dir", out, *RL_SMALL)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "eval/toy/avg@2" in rows[0]
    assert "w_mean/step1" in rows[1] and "d1_mean" in rows[1] and "frac_w_below_0.5" in rows[1]
    steps = [json.loads(x) for x in (out / "steps.jsonl").read_text().splitlines()]
    assert {"d", "w", "tool_call", "tool_status", "reward"} <= set(steps[0])
    assert (out / "step_weights.png").exists()


@pytest.mark.parametrize("mode", ["opd", "gated", "opsd_gt", "opsd_hint"])
def test_every_distillation_mode_runs(runs, mode, tmp_path):
    teacher = runs / "sft-teacher" / "final"  # any checkpoint with the shared tokenizer will do
    cfg = sod_distill.Config(student=str(runs / "sft-student" / "final"), mode=mode,
                             teacher="" if mode.startswith("opsd") else str(teacher),
                             out_dir=str(tmp_path / mode), steps=1, prompts_per_step=2, n_samples=2,
                             eval_every=0, eval_prompts=2, eval_n=1, max_response_tokens=64)
    sod_distill.main(cfg)
    assert (tmp_path / mode / "final" / "model.safetensors").exists()


def test_rl_run_resumes_from_its_checkpoint(runs):
    out = runs / "grpo-resume"
    run("grpo.py", "--model", runs / "sft-teacher" / "final", "--out_dir", out, *RL_SMALL)
    # a later invocation with --resume and more steps continues from the last saved step
    run("grpo.py", "--model", runs / "sft-teacher" / "final", "--out_dir", out, *RL_SMALL,
        "--steps", 3, "--resume", "true")
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # the resumed run does not evaluate its starting point again


def test_evaluate_script(runs):
    out = runs / "eval"
    stdout = run("evaluate.py", "--model", runs / "sft-student" / "final", runs / "sft-teacher" / "final",
                 "--num_prompts", 3, "--n_samples", 2, "--max_response_tokens", 64, "--out_dir", out)
    assert "avg@2" in stdout and "pass@2" in stdout and "maj@2" in stdout
    results = json.loads((out / "results.json").read_text())["results"]
    assert len(results) == 2
    assert len((out / "generations.jsonl").read_text().splitlines()) == 2 * 3 * 2


def test_pipeline_quick(tmp_path):
    stdout = run("pipeline.py", "--quick", "true", "--out_root", tmp_path)
    for row in ("teacher SFT", "teacher GRPO", "student SFT", "student GRPO", "student OPD", "student SOD"):
        assert f"| {row} |" in stdout
    assert "| samples that met a failed call (%) |" in stdout and "| the first turn |" in stdout


def test_toy_gap_script_counts_every_first_call(runs):
    stdout = run("scripts/toy_gap.py", "--model", runs / "sft-student" / "final", "--num_prompts", 8,
                 "--n_samples", 2)
    row = next(line for line in stdout.splitlines() if line.startswith(f"| {runs}"))
    right, exact, slash, other = (float(x) for x in row.strip("| ").split(" | ")[1:])
    assert 0 <= right <= 100 and abs(exact + slash + other - 100) < 0.2


def test_the_first_call_of_a_gap_problem_is_exact_slash_or_other():
    spec = importlib.util.spec_from_file_location("toy_gap", REPO / "scripts" / "toy_gap.py")
    toy_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy_gap)
    line = "a = 47 / 5"
    assert toy_gap.first_call_kind(line, "print(47 // 5)") == "exact"
    assert toy_gap.first_call_kind(line, "print(47/5)") == "slash"
    assert toy_gap.first_call_kind(line, "print(47 // 6)") == "other"
    assert toy_gap.first_call_kind(line, {"name": "x"}) == "other"


def test_speed_script_runs_at_tiny_sizes():
    """scripts/speed.py --quick: every measurement of docs/speed.md runs and its two sides agree (its numbers
    at these sizes mean nothing, and no test asserts a speed)."""
    stdout = run("scripts/speed.py", "--quick")
    assert "step weights 4 x 256" in stdout and "tool calls of a turn" in stdout
    assert "SFT steps of the toy teacher" in stdout


def test_the_turn_phases_split_sod_turns_by_a_dividing_first_call_and_by_rl_step(tmp_path):
    spec = importlib.util.spec_from_file_location("toy_gap", REPO / "scripts" / "toy_gap.py")
    toy_gap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy_gap)

    def turn(rl_step, traj, step, d, w, call, after_error=False):
        return {"rl_step": rl_step, "traj": traj, "step": step, "d": d, "w": w, "tool_call": call,
                "tool_status": "ok", "after_tool_error": after_error, "previous_failure": None}
    records = []
    for rl_step in range(1, 11):  # steps 1-5 are the first phase, 6-10 the last
        records += [turn(rl_step, 0, 1, 1.0, 1.0, "print(47 / 8)"), turn(rl_step, 0, 2, 3.0, 0.5, "print(6.875)"),
                    turn(rl_step, 1, 1, 0.2, 1.0, "print(3 * 4)"), turn(rl_step, 1, 2, rl_step, 0.1, None, True)]
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {line.split(" | ")[0].strip("| "): line.strip(" |").split(" | ")[1:]
            for line in toy_gap.turn_phases([tmp_path]).splitlines()[2:]}
    assert rows["the first turn"] == ["1.00 / 1.00", "1.00 / 1.00", "0.20 / 1.00", "0.20 / 1.00"]
    assert rows["later turns, no failed tool call before them"] == ["3.00 / 0.50", "3.00 / 0.50", "-", "-"]
    assert rows["turns after a failed tool call"] == ["-", "-", "3.00 / 0.10", "8.00 / 0.10"]  # 1-5, 6-10
