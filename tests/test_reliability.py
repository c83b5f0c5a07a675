"""Runs that survive anything: kills at any instant, two runs in one folder, non-finite numbers, bad
checkpoints.

The kill harness SIGKILLs a stage inside every file operation of a checkpoint save (tests/stage_driver.py
counts them) and at random instants (seeded, the same in every run), resumes it, and compares the result with
an uninterrupted run: weights and every non-timing metric must be bit-identical. The CI version covers every
file operation of one save of sft.py and two random kills of grpo.py (with the KL penalty) and sod_distill.py;
SOD_LONG_KILL_HARNESS=1 runs every file operation of every stage and more random kills.
"""
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import rollout
import sft
from common import dist, models, runs

REPO = Path(__file__).resolve().parent.parent
DRIVER = str(REPO / "tests" / "stage_driver.py")
LONG = os.environ.get("SOD_LONG_KILL_HARNESS") == "1"
SCOPE = {"SOD_KILL_SCOPE": "all"} if LONG else {}  # long: also inside the libraries' own writes


def stage(*args, env=None, check=True):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    out = subprocess.run([sys.executable, DRIVER, *map(str, args)], cwd=REPO, env=full_env,
                         capture_output=True, text=True, timeout=600)
    if check:
        assert out.returncode == 0, f"{args}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


def outcome(out_dir: Path):
    """What must not depend on kills: the final weights, and the metrics without timings and the run id."""
    weights = load_file(str(out_dir / "final" / "model.safetensors"))
    rows = [{k: v for k, v in json.loads(line).items()
             if not k.startswith("t_") and k not in ("run_id", "tokens_per_s")}
            for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return weights, rows


def assert_same_outcome(a: Path, b: Path):
    (wa, ra), (wb, rb) = outcome(a), outcome(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ"
    assert ra == rb, "metrics differ"
    ids = {json.loads(line)["run_id"] for line in (b / "metrics.jsonl").read_text().splitlines()}
    assert len(ids) == 1  # every row of the resumed run carries the run's one id


def latest_step(out_dir: Path) -> int:
    ckpt = runs.latest_checkpoint(out_dir)
    return int(ckpt.name.split("-")[-1]) if ckpt else 0


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("start")
    stage("sft", "--max_steps", 20, "--toy_examples", 640, "--eval_prompts", 0, "--out_dir", root / "student")
    stage("sft", "--model", "toy-teacher", "--max_steps", 20, "--toy_examples", 640, "--eval_prompts", 0,
          "--toy_recovery_frac", 0, "--out_dir", root / "teacher")
    return root


SFT = ["sft", "--max_steps", 3, "--toy_examples", 96, "--batch_size", 16, "--micro_batch_size", 8,
       "--save_every", 1, "--eval_prompts", 0]


def saves_of_a_run(args, out_dir: Path, log: Path) -> list[tuple[int, int, int]]:
    """(step, first file operation, last file operation) of every checkpoint save of an uninterrupted run."""
    stage(*args, "--out_dir", out_dir, env={"SOD_KILL_AT_FILE_OP": "-1", "SOD_SAVE_LOG": str(log), **SCOPE})
    return [tuple(map(int, line.split())) for line in log.read_text().splitlines()]


def test_a_kill_inside_any_file_operation_of_a_save_loses_nothing_and_resumes_exactly(tmp_path):
    saves = saves_of_a_run(SFT, tmp_path / "straight", tmp_path / "saves.log")
    assert [step for step, _, _ in saves] == [1, 2, 3] and all(last > first for _, first, last in saves)
    # CI: every file operation of the second save; SOD_LONG_KILL_HARNESS=1: of all three
    ops = range(1, saves[-1][2] + 1) if LONG else range(saves[1][1], saves[1][2] + 1)
    for n in ops:
        out, log = tmp_path / f"killed-at-{n}", tmp_path / f"killed-at-{n}.log"
        killed = stage(*SFT, "--out_dir", out,
                       env={"SOD_KILL_AT_FILE_OP": str(n), "SOD_SAVE_LOG": str(log), **SCOPE}, check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
        completed = [int(line.split()[0]) for line in log.read_text().splitlines()] if log.exists() else []
        # only the steps since the last completed save
        assert latest_step(out) >= max(completed, default=0), n
        stage(*SFT, "--out_dir", out, "--resume")
        assert_same_outcome(tmp_path / "straight", out)


def rl(name, start, *extra, steps=3):
    models = (["--model", start / "student" / "final"] if name == "grpo" else
              ["--student", start / "student" / "final", "--teacher", start / "teacher" / "final"])
    return [name, *models, "--steps", steps, "--prompts_per_step", 2, "--n_samples", 4,
            "--max_response_tokens", 48, "--overlong_buffer", 48, "--eval_every", 0, "--eval_prompts", 2,
            "--eval_n", 1, "--save_every", 1, *extra]


RANDOM_KILLS = ([("grpo", ["--kl_coef", "0.1"]), ("sod", [])]
                + ([("grpo", []), ("sod", ["--kl_coef", "0.1"])] if LONG else []))
# a kill lands within the step after checkpoint k, for k up to steps - 2: at least a whole step before final/
RANDOM_KILL_STEPS = 8 if LONG else 4


def driver(args, out_dir: Path, *extra) -> subprocess.Popen:
    """A stage started in the background, its output appended to out_dir.log."""
    with open(f"{out_dir}.log", "a") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen([sys.executable, DRIVER, *map(str, args), "--out_dir", str(out_dir), *extra],
                                cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=log, stderr=log)


def wait_for_checkpoint(proc, out_dir: Path, step: int) -> float:
    """Seconds until checkpoint `step` (or a later one) of a running stage is complete."""
    t0 = time.time()
    while latest_step(out_dir) < step:
        assert proc.poll() is None, (f"the run ended (exit {proc.returncode}) before checkpoint {step}:\n"
                                     + Path(f"{out_dir}.log").read_text()[-3000:])
        time.sleep(0.02)
    return time.time() - t0


@pytest.mark.parametrize("name, extra", RANDOM_KILLS)
def test_random_kills_of_an_rl_run_resume_to_the_same_result(start, tmp_path, name, extra):
    """The run is killed at random instants, each after its first checkpoint and before final/ (a kill before
    the first save would compare two fresh runs), and resumed; the result equals an uninterrupted run's."""
    steps = RANDOM_KILL_STEPS
    args = rl(name, start, *extra, steps=steps)
    straight = driver(args, tmp_path / "straight")
    done = [wait_for_checkpoint(straight, tmp_path / "straight", k) for k in range(1, steps + 1)]
    assert straight.wait() == 0
    step_seconds = min(done[1:])  # the shortest step, from one checkpoint to the next
    rng = random.Random(zlib.crc32(f"{name} {' '.join(extra)}".encode()))  # the same instants in every run
    out, kills = tmp_path / "killed", 0
    while (resumed_from := latest_step(out)) + 1 <= steps - 2 and kills < (steps - 2 if LONG else 2):
        proc = driver(args, out, "--resume")
        wait_for_checkpoint(proc, out, resumed_from + 1)
        time.sleep(rng.uniform(0.0, 1.0) * step_seconds)  # somewhere in the next step, its save included
        assert proc.poll() is None, "the run ended before its kill"
        proc.kill()
        proc.wait()
        kills += 1
        assert latest_step(out) >= 1 and not (out / "final").exists(), \
            f"kill {kills} did not land between the first checkpoint and final/"
    assert kills >= 1
    stage(*args, "--out_dir", out, "--resume")
    assert_same_outcome(tmp_path / "straight", out)


def test_resume_without_a_checkpoint_says_what_it_found_and_starts_over(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".checkpoint-000002.tmp").mkdir()   # a save that never finished
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    result = stage(*SFT, "--max_steps", 1, "--out_dir", out, "--resume")
    assert "no complete checkpoint" in result.stderr and ".checkpoint-000002.tmp" in result.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]


def test_a_second_run_into_the_same_folder_is_refused_with_who_holds_it(tmp_path):
    out = tmp_path / "busy"
    runs.lock_out_dir(out, dist.Dist())   # this process holds the folder
    result = stage(*SFT, "--max_steps", 1, "--out_dir", out, check=False)
    assert result.returncode != 0
    assert f"is in use by pid {os.getpid()}" in result.stderr
    assert not (out / "metrics.jsonl").exists()


# -----------------------------------------------------------------------------
# non-finite numbers

def test_a_checkpoint_with_nan_weights_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "bad"
    model = models.load_model("toy-student", device="cpu")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = math.nan
    model.save_pretrained(path)
    models.load_tokenizer("toy-student").save_pretrained(path)
    with pytest.raises(SystemExit, match=f"{path}: the weights are not finite.*layers.0.mlp.up_proj"):
        sft.main(sft.Config(model=str(path), max_steps=1, toy_examples=32, eval_prompts=0,
                            out_dir=str(tmp_path / "o")))
    assert not (tmp_path / "o").exists()


def test_a_step_with_a_non_finite_gradient_is_skipped_and_counted_and_a_run_of_them_stops(tmp_path,
                                                                                          monkeypatch):
    real = rollout.token_logprobs
    poisoned = {"calls": 0, "from": 10**9}

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        poisoned["calls"] += 1
        return out * math.nan if poisoned["calls"] >= poisoned["from"] else out

    monkeypatch.setattr(rollout, "token_logprobs", sometimes_nan)
    cfg = sft.Config(max_steps=5, toy_examples=32, batch_size=16, micro_batch_size=16, eval_prompts=0,
                     out_dir=str(tmp_path / "one_bad"))
    poisoned.update(calls=0, **{"from": 2})  # step 2 on: every step is NaN
    with pytest.raises(SystemExit, match="non-finite gradient norm"):
        sft.main(cfg)
    rows = [json.loads(x) for x in (tmp_path / "one_bad" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 2]   # the third in a row (step 4) stops the run


def test_a_single_non_finite_step_leaves_the_weights_as_they_were(tmp_path, monkeypatch):
    real_logprobs, real_step = rollout.token_logprobs, runs.optimizer_step
    calls, snapshots = {"n": 0}, []

    def nan_on_second_step(*args, **kwargs):
        calls["n"] += 1
        out = real_logprobs(*args, **kwargs)
        return out * math.nan if calls["n"] == 2 else out

    def step_and_watch(optimizer, model, *args):
        before = [p.detach().clone() for p in model.parameters()]
        norm = real_step(optimizer, model, *args)
        snapshots.append((norm, all(torch.equal(a, p) for a, p in zip(before, model.parameters()))))
        return norm

    monkeypatch.setattr(rollout, "token_logprobs", nan_on_second_step)
    monkeypatch.setattr(runs, "optimizer_step", step_and_watch)
    model = sft.main(sft.Config(max_steps=3, toy_examples=48, batch_size=16, micro_batch_size=16,
                                eval_prompts=0, out_dir=str(tmp_path / "run")))
    # only the NaN step left them alone
    assert [unchanged for _, unchanged in snapshots] == [False, True, False]
    assert not math.isfinite(snapshots[1][0]) and all(torch.isfinite(p).all() for p in model.parameters())
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1]


# -----------------------------------------------------------------------------
# bad checkpoints and full disks

def test_a_truncated_weights_file_is_named(tmp_path):
    path = tmp_path / "cut"
    models.load_model("toy-student", device="cpu").save_pretrained(path)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(SystemExit, match=f"could not load model weights from {weights}"):
        models.load_model(str(path), device="cpu")


def test_a_tokenizer_mismatch_says_how_many_tokens_differ():
    a, b = models.load_tokenizer("toy-student"), models.load_tokenizer("toy-student")
    b.add_tokens(["<only_in_the_teacher>"])
    with pytest.raises(SystemExit, match=r"disagree on 1 tokens, e.g. \['<only_in_the_teacher>'\]"):
        models.check_same_tokenizer(a, b)


def test_a_full_disk_during_a_checkpoint_says_so_and_keeps_the_last_one(tmp_path, monkeypatch):
    import errno
    cfg = sft.Config(max_steps=2, toy_examples=32, batch_size=16, micro_batch_size=16, eval_prompts=0,
                     save_every=1, out_dir=str(tmp_path / "run"))
    real_save = torch.save
    saves = {"n": 0}

    # the disk fills up while the 2nd checkpoint is written
    def no_space_on_second(obj, path, *args, **kwargs):
        saves["n"] += str(path).endswith("trainer_state.pt")
        if saves["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", no_space_on_second)
    with pytest.raises(SystemExit, match="no space left on the device.*checkpoint-000001.*is intact"):
        sft.main(cfg)
    assert runs.latest_checkpoint(tmp_path / "run").name == "checkpoint-000001"
