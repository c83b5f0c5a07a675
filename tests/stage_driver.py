"""Runs a stage the way `python FILE.py` does, under python or torchrun, with two test-only changes:

  - sampling that does not depend on the batch or the rank: each context is decoded alone, with its
    request's seed (a trajectory's seed comes from its global index). One process and two ranks then roll out
    the same global batch, and so do the asynchronous and synchronous schedules;
  - SOD_STOP_AFTER_SAVE=k stops the run right after its checkpoint of step k is saved, on every rank;
  - SOD_KILL_AT_FILE_OP=n SIGKILLs the process at the n-th file operation (1-based) of its checkpoint saves:
    every os.replace, rmtree, mkdir, unlink, file write, torch.save, distributed-checkpoint or Hugging Face
    save that runs.save_checkpoint makes (SOD_KILL_SCOPE=all: also those the libraries make inside them).

    python tests/stage_driver.py grpo --model ... --out_dir ...
    torchrun --nproc_per_node=2 tests/stage_driver.py grpo --model ... --out_dir ...
"""
import os
import signal
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import evaluate  # noqa: E402
import grpo  # noqa: E402
import sft  # noqa: E402
import sod_distill  # noqa: E402
from common import cli, engines, runs  # noqa: E402

real_generate_hf = engines.generate_hf


def generate_each_context_alone(model, contexts, max_new_tokens, temperature, top_p, stop_ids, pad_id,
                                seeds=None, batch_size=256):
    """Each context decoded alone, with its request's own seed (rollouts are seeded per trajectory and turn,
    by the trajectory's global index); an unseeded call is seeded by the context's token ids."""
    seen, out = Counter(), []
    for i, (ctx, budget) in enumerate(zip(contexts, max_new_tokens)):
        if seeds is None:
            key = tuple(ctx)
            torch.manual_seed(hash((key, seen[key])) % 2**31)
            seen[key] += 1
        out += real_generate_hf(model, [ctx], [budget], temperature, top_p, stop_ids, pad_id,
                                seeds=None if seeds is None else [seeds[i]])
    return out


engines.generate_hf = generate_each_context_alone

stop_after = int(os.environ.get("SOD_STOP_AFTER_SAVE", "0"))
real_save = runs.save_checkpoint


def save_then_maybe_stop(out_dir, step, *args, **kwargs):
    real_save(out_dir, step, *args, **kwargs)
    if step == stop_after:
        raise SystemExit(0)


runs.save_checkpoint = save_then_maybe_stop

kill_at = int(os.environ.get("SOD_KILL_AT_FILE_OP", "0"))  # -1: count the operations, kill nowhere
save_log = os.environ.get("SOD_SAVE_LOG")                   # "step first_op last_op" per completed save
file_ops = {"n": 0, "saving": False}


every_op = os.environ.get("SOD_KILL_SCOPE") == "all"


def counted(fn):
    """fn, with a SIGKILL of this process just before its kill_at-th call inside a checkpoint save."""
    def wrapper(*args, **kwargs):
        if file_ops["saving"] and (every_op or sys._getframe(1).f_code.co_filename.endswith("runs.py")):
            file_ops["n"] += 1
            if file_ops["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return wrapper


if kill_at:
    import shutil

    import torch.distributed.checkpoint as dcp
    os.replace = counted(os.replace)
    shutil.rmtree = counted(shutil.rmtree)
    Path.mkdir = counted(Path.mkdir)
    Path.write_text = counted(Path.write_text)
    Path.unlink = counted(Path.unlink)
    torch.save = counted(torch.save)
    dcp.save = counted(dcp.save)
    runs._save_hf = counted(runs._save_hf)
    inner_save = runs.save_checkpoint

    def save_counting_file_ops(out_dir, step, *args, **kwargs):
        first = file_ops["n"] + 1
        file_ops["saving"] = True
        try:
            inner_save(out_dir, step, *args, **kwargs)
        finally:
            file_ops["saving"] = False
        if save_log:
            with open(save_log, "a") as f:
                f.write(f"{step} {first} {file_ops['n']}\n")

    runs.save_checkpoint = save_counting_file_ops

if __name__ == "__main__":
    stage = sys.argv.pop(1)
    main, config = {"sft": (sft.main, sft.Config), "grpo": (grpo.main, grpo.Config),
                    "evaluate": (evaluate.main, evaluate.Config),
                    "sod": (sod_distill.main, sod_distill.Config)}[stage]
    cli.run_script(main, config)
