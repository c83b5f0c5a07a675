"""What a newcomer meets first: --help, boolean flags, paths that do not exist, Ctrl-C, a pipeline that knows
what it may reuse."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common import models, runs

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["sft.py", "grpo.py", "sod_distill.py", "evaluate.py", "pipeline.py", "rollout.py"]


def run(*args, check=True, timeout=600):
    out = subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))
    if check:
        assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_has_a_help_that_works(script):
    out = run(script, "--help")
    assert "usage:" in out.stdout and "(default: )" not in out.stdout


def test_help_lists_only_the_flags_a_stage_accepts():
    out = run("sod_distill.py", "--help").stdout
    assert "--student" in out and "--model" not in out
    refused = run("sod_distill.py", "--model", "x", "--steps", "0", check=False)
    assert refused.returncode != 0 and "--model" in refused.stderr


def test_help_groups_each_flag_under_the_config_that_declares_it():
    out = run("sod_distill.py", "--help").stdout
    headings = [line for line in out.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    sections = {h: out.split(h, 1)[1].split("\n\n", 1)[0] for h in headings}

    def section_of(flag):
        (heading,) = [h for h, text in sections.items() if f"  --{flag} " in text or f"  --{flag}\n" in text]
        return heading
    assert "(Faults)" in section_of("tool_failure_rate") and "(ToolConfig)" in section_of("tool_timeout")
    assert "(RewardConfig)" in section_of("overlong_buffer") and "(RolloutConfig)" in section_of("max_turns")
    assert section_of("delta") == "this stage:" and "(Config)" in section_of("kl_coef")


def test_boolean_flags_work_bare_negated_or_with_a_value():
    from dataclasses import dataclass

    from common.cli import arg, parse_args

    @dataclass
    class Flags:
        resume: bool = arg(False, "resume")
        quick: bool = arg(True, "quick")
    assert parse_args(Flags, ["--resume"]) == Flags(resume=True)
    assert parse_args(Flags, ["--no-quick"]) == Flags(quick=False)
    assert parse_args(Flags, ["--resume", "false", "--quick", "yes"]) == Flags(resume=False, quick=True)
    for bad in ("ture", "2", ""):
        with pytest.raises(SystemExit):
            parse_args(Flags, ["--resume", bad])


def test_an_invalid_boolean_exits_naming_the_flag():
    out = run("grpo.py", "--resume", "ture", check=False)
    assert out.returncode != 0 and "--resume" in out.stderr and "'ture'" in out.stderr


@pytest.mark.parametrize("path", ["runs/does-not-exist", "does-not-exist", "./nope", "/tmp/sod-no-such/final",
                                  "runs/sft-teacher/final-nope", "a/b/c"])
def test_a_missing_model_path_of_any_shape_does_not_exist_and_nothing_is_written(tmp_path, path):
    out_dir = tmp_path / "eval"
    out_dir.mkdir()
    (out_dir / "generations.jsonl").write_text("earlier results\n")
    result = run("evaluate.py", "--model", path, "--out_dir", out_dir, check=False)
    assert result.returncode != 0 and "does not exist" in result.stderr
    assert (out_dir / "generations.jsonl").read_text() == "earlier results\n"
    result = run("grpo.py", "--model", path, "--out_dir", tmp_path / "grpo", check=False)
    assert result.returncode != 0 and "does not exist" in result.stderr and not (tmp_path / "grpo").exists()


def test_a_missing_default_checkpoint_says_which_command_makes_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a folder without runs/, whatever the checkout holds
    with pytest.raises(SystemExit, match=r"runs/grpo-teacher/final.*python grpo.py"):
        models.check_model_path("runs/grpo-teacher/final")


@pytest.mark.slow
def test_ctrl_c_stops_with_one_line_and_leaves_no_sandbox_behind(tmp_path):
    # long enough (400 steps) that the interrupt always lands before the end
    args = ["sft.py", "--toy_examples", "200", "--epochs", "50", "--max_steps", "400", "--eval_prompts", "0",
            "--batch_size", "8", "--out_dir", str(tmp_path / "run")]
    # the child gets Ctrl-C's default disposition, as in a terminal, even when this test runs under a parent that
    # ignores SIGINT (a background job of a shell without job control), which the child would otherwise inherit
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics, deadline = tmp_path / "run" / "metrics.jsonl", time.time() + 120
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:  # a step was taken
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert "interrupted at step" in stderr and "resume with: python sft.py" in stderr and "--resume" in stderr


# -----------------------------------------------------------------------------
# the pipeline reuses only what the same settings, inputs and code made

def stage_lines(stdout: str) -> dict:
    """{stage: what happened} from the pipeline's own '=== name: ...' lines."""
    lines = [line[4:] for line in stdout.splitlines() if line.startswith("=== ") and ": " in line]
    return {name: what for name, what in (line.split(": ", 1) for line in lines)}


@pytest.mark.slow
def test_the_pipeline_reruns_exactly_what_a_changed_flag_affects(tmp_path):
    first = run("pipeline.py", "--quick", "--out_root", tmp_path)
    assert "these numbers mean nothing" in first.stdout
    again = stage_lines(run("pipeline.py", "--quick", "--out_root", tmp_path).stdout)
    assert again and all(what.startswith("reused") for what in again.values()), again
    # --rl_steps is the students' budget: the teacher's GRPO is reused, every student run trains again
    changed = run("pipeline.py", "--quick", "--out_root", tmp_path, "--rl_steps", 1).stdout
    what = stage_lines(changed)
    for name in ("sft teacher", "sft student", "grpo teacher"):
        assert what[name].startswith("reused"), (name, what[name])
    for name in ("grpo student (seed 0)", "opd student (seed 0)", "sod student (seed 0)"):
        assert f"=== {name}: running again, settings changed (steps: 2 -> 1)" in changed, name
    # --teacher_rl_steps: the teacher's GRPO trains again, and so do the runs distilled from it, and only they
    changed = run("pipeline.py", "--quick", "--out_root", tmp_path, "--rl_steps", 1,
                  "--teacher_rl_steps", 1).stdout
    what = stage_lines(changed)
    assert "=== grpo teacher: running again, settings changed (steps: 2 -> 1)" in changed
    assert what["grpo student (seed 0)"].startswith("reused"), what
    for name in ("opd student (seed 0)", "sod student (seed 0)"):
        assert f"=== {name}: running again, its inputs changed" in changed, name
    record = json.loads((tmp_path / "grpo-teacher" / "pipeline_stage.json").read_text())
    assert record["settings"]["steps"] == 1 and record["code_version"] == runs.code_version()


def test_every_preset_names_a_built_in_teacher_and_each_toy_teacher_outgrows_the_student():
    from common.presets import PRESETS
    named = {preset["teacher_model"] for preset in PRESETS.values() if "teacher_model" in preset}
    assert named and named <= set(models.TOY_MODELS), named
    built = {name: models.load_model(name, device="cpu") for name in models.TOY_MODELS}
    size = {name: sum(p.numel() for p in model.parameters()) for name, model in built.items()}
    layers = {name: model.config.num_hidden_layers for name, model in built.items()}
    assert size["toy-student"] < size["toy-teacher-small"] < size["toy-teacher"] < size["toy-teacher-large"]
    assert layers == {"toy-student": 2, "toy-teacher-small": 3, "toy-teacher": 4, "toy-teacher-large": 4}


def test_a_python_below_the_stated_floor_stops_with_a_message():
    """The project states Python 3.11 (README, requirements.txt, ruff.toml): an older one stops at the first
    import, before a run goes anywhere near the rollout's timeouts."""
    older = [p for p in sorted(Path.home().glob(".pyenv/versions/3.10*/bin/python")) if p.is_file()]
    if not older:
        pytest.skip("no Python 3.10 on this machine")
    out = subprocess.run([str(older[0]), "-c", "import common"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0 and "needs Python 3.11 or newer" in out.stderr
