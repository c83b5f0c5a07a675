"""Run a pipeline's stages side by side: each in a process of its own, with a share of the threads.

The toy's models are tiny, and a second thread helps some stages more than others. Measured on 2 cores (an AMD
EPYC with AVX2), a stage at one thread beside another, against the same stage alone at two threads: the
teacher's SFT took 1.8x as long (5,034 against 9,208 tokens/s), the RL stages 1.5x to 1.8x (the student's GRPO
191 s against 129 s, the teacher's 254 s against 142 s). The student's SFT, alone, ran 1.44x slower at one
thread than at two (14,748 against 21,215 tokens/s). So two stages side by side finish sooner than one after
the other, except the teacher's SFT, which is better run alone. A stage at one thread computes the same bits
beside another stage as alone. At two threads, generation may round differently: torch's CPU attention kernel
at a single query position (each generated token) gives other bits at one thread and at two, so a rare sample
of a rollout can change (docs/results.md, "The default pipeline"). Training forwards and backwards over whole
sequences gave the same bits at one and two threads on that AMD EPYC, but not on an Intel Xeon with AVX-512.

A job names the jobs it must wait for. The scheduler starts ready jobs in the order they were listed, at most
`workers` at once, except that a job marked `alone` runs by itself with every thread and goes first once it is
ready. Each child writes its output to the job's log file, and its return value comes back to the parent. When
a job fails or the parent is interrupted (Ctrl-C, SIGTERM), the others are stopped; the stages' own checkpoints
let a rerun resume.
"""
import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable


@dataclass
class Job:
    name: str
    fn: Callable  # a module-level function (it travels to the child by name)
    args: tuple
    log: Path  # the child's stdout and stderr
    after: list[str] = field(default_factory=list)  # jobs that must finish first
    alone: bool = False  # run by itself with every thread (a job that one thread slows down most)


def _child(conn, job: Job, threads: int, setup: Callable | None, setup_args: tuple):
    """In the child: send stdout/stderr to the log, set up the process, run the job, send back its result."""
    if sys.platform == "linux":  # the fork server exits with the scheduler's process, and the stage with it
        parent = os.getppid()
        ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG: no orphaned stage
        if os.getppid() != parent:
            os._exit(1)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    out = os.open(job.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)  # fd level: subprocesses and C libraries write there too
    os.dup2(out, 2)
    try:
        import torch
        torch.set_num_threads(threads)
        if setup is not None:
            setup(*setup_args)
        conn.send(("done", job.fn(*job.args)))
    except KeyboardInterrupt:
        conn.send(("interrupted", None))
    except BaseException:
        traceback.print_exc()
        conn.send(("failed", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def _stop_on_sigterm(signum, frame):
    """SIGTERM (kill, a scheduler's preemption) as an exception, so that run() stops its stages before it exits:
    the default action would end this process at once and leave the stages training, holding their folders."""
    raise SystemExit(f"stopped by {signal.Signals(signum).name}; the stages' checkpoints let a rerun resume")


def run(jobs: list[Job], workers: int, threads: int, setup: Callable | None = None, setup_args: tuple = (),
        on_done: Callable | None = None) -> dict:
    """Run every job, `workers` at a time, each child at `threads` threads (a job that runs alone: at
    workers x threads); returns {name: result}.
    setup(*setup_args) runs first in every child (logging, CPU kernels, sandbox); on_done(job, result, seconds)
    in the parent as each job ends."""
    names = [j.name for j in jobs]
    for j in jobs:
        unknown = [a for a in j.after if a not in names[:names.index(j.name)]]
        if unknown:
            raise ValueError(f"job {j.name!r} waits for {unknown}, which are not listed before it")
    if "forkserver" not in multiprocessing.get_all_start_methods():  # Windows
        workers = 1
    if workers == 1:  # one after another, in this process, at this process's threads: output to the terminal
        results = {}
        for job in jobs:
            start = time.time()
            results[job.name] = job.fn(*job.args)
            if on_done is not None:
                on_done(job, results[job.name], time.time() - start)
        return results
    # Children are forked from a server process that has imported the caller's modules once (torch and
    # transformers take seconds to import) and has computed nothing: no threads, no torch state to inherit.
    spawn = multiprocessing.get_context("forkserver")
    spawn.set_forkserver_preload(["__main__", "torch", "transformers"])
    results, pending, running = {}, list(jobs), {}  # running: sentinel -> (job, process, connection, start)
    main_thread = threading.current_thread() is threading.main_thread()  # only there can a handler be set
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    try:
        while pending or running:
            ready = [j for j in pending if all(a in results for a in j.after)]
            alone = [j for j in ready if j.alone]
            if alone:  # a job that runs alone goes first, once the running ones are done
                start = alone[:1] if not running else []
            else:  # nothing starts next to a job that runs alone
                busy = any(job.alone for job, *_ in running.values())
                start = [] if busy else ready[:max(0, workers - len(running))]
            for job in start:
                receive, send = spawn.Pipe(duplex=False)
                n = threads * workers if job.alone else threads
                process = spawn.Process(target=_child, args=(send, job, n, setup, setup_args),
                                        name=job.name, daemon=True)
                process.start()
                send.close()
                running[process.sentinel] = (job, process, receive, time.time())
                pending.remove(job)
                print(f"=== {job.name}: started, {n} thread{'s' * (n > 1)} (log: {job.log})", flush=True)
            if not running:
                raise RuntimeError(f"jobs wait for each other: {[j.name for j in pending]}")
            for sentinel in wait(list(running)):
                job, process, receive, start = running.pop(sentinel)
                status, value = receive.recv() if receive.poll() else ("died", process.exitcode)
                process.join()
                if status == "interrupted":
                    raise KeyboardInterrupt
                if status != "done":
                    tail = "".join(job.log.read_text(errors="replace").splitlines(keepends=True)[-30:])
                    raise SystemExit(f"{job.name} failed ({status}, exit code {process.exitcode}); the end of "
                                     f"its log {job.log}:\n{tail}")
                results[job.name] = value
                if on_done is not None:
                    on_done(job, value, time.time() - start)
    except BaseException as stop:
        # A failure: the other jobs are stopped at once (checkpoints are written atomically, so a rerun resumes
        # from the last complete one). Ctrl-C in a terminal reached the children too: they get a few seconds to
        # stop, and a SIGINT of their own if it was sent to this process alone.
        interrupted = isinstance(stop, KeyboardInterrupt)
        for job, process, _, _ in running.values():
            process.join(timeout=5 if interrupted else 0)
            if process.is_alive():
                os.kill(process.pid, signal.SIGINT if interrupted else signal.SIGTERM)
                process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
        raise
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    return results
