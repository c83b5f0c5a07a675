"""Jobs side by side (common/jobs.py): each waits for the jobs it lists, at most `workers` run at once, their
results come back, and one failure stops the others with the end of its log. And the stages those jobs run
(common/stages.py): reused, resumed or run again, and saying which."""
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from common import jobs, stages


def stamp(path, seconds, value):
    """A job: sleep, then record when it ran; returns value."""
    start = time.time()
    time.sleep(seconds)
    path.write_text(json.dumps([start, time.time()]))
    print("job output goes to its log")
    return value


def threads_and_time(path, seconds):
    """A job: sleep, then record when it ran and at how many threads."""
    import torch
    start = time.time()
    time.sleep(seconds)
    path.write_text(json.dumps([start, time.time()]))
    return torch.get_num_threads()


def broken():
    raise ValueError("broken on purpose")


def test_jobs_wait_for_what_they_list_and_run_at_most_workers_at_once(tmp_path):
    def job(name, after=()):
        return jobs.Job(name, stamp, (tmp_path / f"{name}.json", 1.5, name.upper()), tmp_path / f"{name}.log",
                        list(after))
    plan = [job("a"), job("b"), job("c", after=["a"]), job("d", after=["a", "b"])]
    results = jobs.run(plan, workers=2, threads=1)
    assert results == {"a": "A", "b": "B", "c": "C", "d": "D"}
    ran = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in "abcd"}
    assert ran["c"][0] >= ran["a"][1] and ran["d"][0] >= max(ran["a"][1], ran["b"][1])  # after what they list
    assert ran["a"][0] < ran["b"][1] and ran["b"][0] < ran["a"][1]  # a and b side by side
    for t in [start for start, _ in ran.values()]:  # never more than two at once
        assert sum(start <= t < end for start, end in ran.values()) <= 2
    assert "job output goes to its log" in (tmp_path / "c.log").read_text()


def test_a_job_marked_alone_runs_first_by_itself_with_every_thread(tmp_path):
    def job(name, alone=False):
        return jobs.Job(name, threads_and_time, (tmp_path / f"{name}.json", 1.5), tmp_path / f"{name}.log",
                        alone=alone)
    threads = jobs.run([job("a"), job("b", alone=True), job("c")], workers=2, threads=1)
    assert threads == {"a": 1, "b": 2, "c": 1}
    ran = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in "abc"}
    assert ran["b"][1] <= min(ran["a"][0], ran["c"][0])  # first, and nothing beside it
    assert ran["a"][0] < ran["c"][1] and ran["c"][0] < ran["a"][1]  # then the other two side by side


def test_one_worker_runs_the_jobs_in_order_in_this_process(tmp_path):
    plan = [jobs.Job(n, stamp, (tmp_path / f"{n}.json", 0.0, n), tmp_path / f"{n}.log") for n in "xy"]
    assert jobs.run(plan, workers=1, threads=1) == {"x": "x", "y": "y"}
    assert not (tmp_path / "x.log").exists()  # output to the terminal, not a log


def test_a_failing_job_stops_the_run_with_the_end_of_its_log(tmp_path):
    plan = [jobs.Job("slow", stamp, (tmp_path / "slow.json", 60.0, None), tmp_path / "slow.log"),
            jobs.Job("broken", broken, (), tmp_path / "broken.log")]
    start = time.time()
    with pytest.raises(SystemExit, match=r"(?s)broken failed.*broken\.log.*ValueError: broken on purpose"):
        jobs.run(plan, workers=2, threads=1)
    assert time.time() - start < 30 and not (tmp_path / "slow.json").exists()  # the other job was stopped


SIGTERM_SCRIPT = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from common import jobs


def sleeper(path):
    path.write_text(str(os.getpid()))
    time.sleep(120)


if __name__ == "__main__":
    jobs.run([jobs.Job("sleeper", sleeper, (Path(sys.argv[1]),), Path(sys.argv[2]))], workers=2, threads=1)
"""


def test_sigterm_to_the_parent_stops_its_stages_too(tmp_path):
    """kill, or a scheduler's preemption: the stages stop with the parent instead of training on as orphans."""
    import os
    import signal
    import subprocess
    import sys
    script, pid_file = tmp_path / "parent.py", tmp_path / "child.pid"
    script.write_text(SIGTERM_SCRIPT.format(root=str(Path(__file__).resolve().parents[1])))
    parent = subprocess.Popen([sys.executable, str(script), str(pid_file), str(tmp_path / "sleeper.log")],
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.2)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    _, err = parent.communicate(timeout=60)
    assert parent.returncode != 0 and "stopped by SIGTERM" in err
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.kill(child, signal.SIGKILL)
        raise AssertionError("the stage outlived its parent")


def test_a_job_that_waits_for_a_later_or_unknown_job_is_refused(tmp_path):
    plan = [jobs.Job("first", stamp, (tmp_path / "f.json", 0.0, 1), tmp_path / "f.log", ["second"]),
            jobs.Job("second", stamp, (tmp_path / "s.json", 0.0, 2), tmp_path / "s.log")]
    with pytest.raises(ValueError, match="not listed before it"):
        jobs.run(plan, workers=2, threads=1)


@dataclass
class ToyStageConfig:
    steps: int = 2
    out_dir: str = ""
    resume: bool = False


def toy_stage(cfg: ToyStageConfig):
    """A stage: writes its final checkpoint, and counts its runs."""
    final = Path(cfg.out_dir) / "final"
    final.mkdir(parents=True, exist_ok=True)
    (final / "config.json").write_text("{}")
    runs = Path(cfg.out_dir) / "runs.txt"
    runs.write_text(runs.read_text() + "x" if runs.exists() else "x")


def test_a_stage_is_reused_only_when_the_same_settings_inputs_and_code_made_it(tmp_path):
    out, start = tmp_path / "stage", tmp_path / "start"
    start.mkdir()
    (start / "model.safetensors").write_bytes(b"weights")

    def run(steps=2):
        return stages.run_stage("toy", out, toy_stage, ToyStageConfig(steps, str(out)), [str(start)])
    assert run().what == "ran"
    again = run()
    assert again.what == "reused (made by the same settings, inputs and code)" and again.seconds is None
    assert run(steps=3).what == "running again, settings changed (steps: 2 -> 3)"
    (start / "model.safetensors").write_bytes(b"other weights")
    assert run(steps=3).what == "running again, its inputs changed"
    assert (out / "runs.txt").read_text() == "xxx"  # the reused run did not run


def test_an_interrupted_stage_resumes_from_its_last_checkpoint(tmp_path):
    out = tmp_path / "stage"
    cfg = ToyStageConfig(out_dir=str(out))
    out.mkdir()
    (out / "pipeline_stage.json").write_text(json.dumps(stages.fingerprint(cfg, [])))
    (out / "checkpoint-1").mkdir()
    (out / "checkpoint-1" / "trainer_state.pt").write_bytes(b"")  # complete, and no final/ yet
    assert stages.run_stage("toy", out, toy_stage, cfg, []).what == "resuming from checkpoint-1"
    assert cfg.resume
