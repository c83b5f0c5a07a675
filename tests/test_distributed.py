"""Every stage under torchrun (two CPU ranks, gloo) against the same stage in one process.

The rollouts of both runs are made equal with tests/stage_driver.py, which samples each context alone (seeded
by its own ids), so that one process and two ranks train on the same global batch; the stages are otherwise
run as users run them. Weights are compared per tensor: ||a - b|| / ||a||."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parent.parent
DRIVER = str(REPO / "tests" / "stage_driver.py")
pytestmark = pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")


def stage(ranks: int, *args, stop_after: int = 0, script: str = DRIVER):
    """Run a stage in one process (ranks=1) or under torchrun; returns stdout + stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1", SOD_STOP_AFTER_SAVE=str(stop_after))
    launcher = [sys.executable] if ranks == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                       "--standalone", f"--nproc_per_node={ranks}"]
    out = subprocess.run([*launcher, script, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, f"{args}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def max_relative_difference(a_dir, b_dir) -> float:
    a, b = (load_file(str(Path(p) / "final" / "model.safetensors")) for p in (a_dir, b_dir))
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).norm() / a[k].norm()).item() for k in a)


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    """Briefly trained student and teacher: their rollouts end at different lengths."""
    root = tmp_path_factory.mktemp("start")
    stage(1, "sft", "--max_steps", 20, "--toy_examples", 640, "--eval_prompts", 0,
          "--out_dir", root / "student")
    stage(1, "sft", "--model", "toy-teacher", "--max_steps", 20, "--toy_examples", 640, "--eval_prompts", 0,
          "--toy_recovery_frac", 0, "--out_dir", root / "teacher")
    return root


SFT = ["sft", "--toy_examples", 64, "--eval_prompts", 0, "--batch_size", 16, "--micro_batch_size", 3]
RL = ["--steps", 1, "--prompts_per_step", 4, "--n_samples", 4, "--max_response_tokens", 64,
      "--overlong_buffer", 64, "--eval_before_train", "false", "--eval_prompts", 4, "--eval_n", 1,
      "--micro_batch_size", 3, "--mini_batches", 2]


def test_two_ranks_say_how_the_run_is_laid_out(tmp_path):
    out = stage(2, *SFT, "--max_steps", 1, "--out_dir", tmp_path / "sft")
    assert out.count("world size 2, rank 0, local rank 0, backend gloo") == 1


def test_one_sft_step_on_two_ranks_equals_one_process(tmp_path):
    stage(1, *SFT, "--max_steps", 1, "--out_dir", tmp_path / "one")
    stage(2, *SFT, "--max_steps", 1, "--out_dir", tmp_path / "two")
    assert max_relative_difference(tmp_path / "one", tmp_path / "two") < 1e-5


@pytest.mark.parametrize("name", ["grpo", "sod"])
def test_one_rl_step_on_two_ranks_equals_one_process(start, tmp_path, name):
    models = (["--model", start / "student" / "final", "--kl_coef", 0.1] if name == "grpo" else
              ["--student", start / "student" / "final", "--teacher", start / "teacher" / "final"])
    stage(1, name, *models, *RL, "--out_dir", tmp_path / "one")
    stage(2, name, *models, *RL, "--out_dir", tmp_path / "two")
    assert max_relative_difference(tmp_path / "one", tmp_path / "two") < 1e-5
    rows = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[-1]) for d in ("one", "two")]
    assert rows[0]["loss"] != 0 and rows[0]["loss"] == pytest.approx(rows[1]["loss"], rel=1e-5)
    for key in ("reward", "acc", "kept_trajectories", "response_tokens"):  # the same global batch
        assert rows[0][key] == rows[1][key]
    if name == "sod":
        steps = [(tmp_path / d / "steps.jsonl").read_text().splitlines() for d in ("one", "two")]
        assert len(steps[0]) == len(steps[1]) > 0


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)])
def test_resume_on_another_number_of_ranks_ends_where_an_uninterrupted_run_does(tmp_path, first, then):
    args = [*SFT, "--max_steps", 3, "--save_every", 1]
    stage(1, *args, "--out_dir", tmp_path / "straight")
    stage(first, *args, "--out_dir", tmp_path / "resumed", stop_after=1)
    assert not (tmp_path / "resumed" / "final").exists()
    stage(then, *args, "--out_dir", tmp_path / "resumed", "--resume")
    assert max_relative_difference(tmp_path / "straight", tmp_path / "resumed") < 1e-5
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_evaluation_on_two_ranks_reports_exactly_the_numbers_of_one_process(start, tmp_path):
    args = ["--model", start / "student" / "final", "--num_prompts", 100, "--n_samples", 2,
            "--max_response_tokens", 48]
    stage(1, *args, "--out_dir", tmp_path / "one", script="evaluate.py")
    stage(2, *args, "--out_dir", tmp_path / "two", script="evaluate.py")
    one, two = (json.loads((tmp_path / d / "results.json").read_text())["results"] for d in ("one", "two"))
    for results in (one, two):
        for r in results.values():
            r["toy"].pop("seconds")
    assert one == two
    assert ((tmp_path / "one" / "generations.jsonl").read_text()
            == (tmp_path / "two" / "generations.jsonl").read_text())


def test_a_plain_run_starts_no_process_group(tmp_path):
    out = stage(1, *SFT, "--max_steps", 1, "--out_dir", tmp_path / "plain")
    assert "one process, device cpu" in out and "world size" not in out
    assert not torch.distributed.is_initialized()
