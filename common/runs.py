"""
common/runs.py: a training run's life: an output folder of its own, a start that resumes exactly, checkpoints
that survive a kill, a final model, and one line on Ctrl-C. sft.py and grpo.py both go through `start_run`
and the `Run` it returns:

    run = start_run(cfg, model, d, device, make_optimizer)   # lock, resume or start clean, seed, shard
    with run:                                                # Ctrl-C: says which checkpoint a resume takes
        for step in run.steps(total, "sft"):                 # a progress bar over the steps left
            ...
            run.log(row)                                     # out_dir/metrics.jsonl, with the run id
            run.save_if_due(step + 1, total, tokenizer, ...) # every save_every steps, and the last one
    run.finish(tokenizer)                                    # out_dir/final/

What a run folder holds:
  out_dir/.lock                    held (flock) for the life of the run; says who holds it
  out_dir/run.json                 the run's settings, code version and run id
  out_dir/checkpoint-000010/       a complete checkpoint: a Hugging Face folder (full weights, tokenizer)
                                   plus trainer/ (model and optimizer, sharded, torch.distributed.checkpoint)
                                   and trainer_state.pt (step, RNG, run id, scheduler)
  out_dir/latest                   the name of the newest complete checkpoint
  out_dir/metrics.jsonl ...        one row per step, each with the run id
  out_dir/final/                   the trained model (Hugging Face folder) and run.json

A checkpoint is written whole under .checkpoint-N.tmp/ and then renamed: a kill at any instant leaves either
no new checkpoint or a complete one, and the older one is deleted only after the new one is in place.
"""
import contextlib
import json
import logging
import os
import random
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from common import cpu_kernels
from common.dist import Dist, all_gather, barrier, full_state_dict, shard
from common.models import REPO_DIR, TOY_DIR

log = logging.getLogger("runs")
MAX_NONFINITE_IN_A_ROW = 3  # optimizer steps skipped for a non-finite gradient norm before the run stops


class Run:
    """A started run: the (sharded) model and its optimizer, where it starts, and its output folder."""

    def __init__(self, cfg, out_dir: Path, d: Dist, model, optimizer, state: dict | None, run_id: str):
        self.cfg, self.out_dir, self.d = cfg, out_dir, d
        self.model, self.optimizer, self.state, self.run_id = model, optimizer, state, run_id
        self.start_step = state["step"] if state else 0
        self.step = self.start_step
        self.health = Counter()  # optimizer steps skipped for a non-finite gradient
        self.bar, self.name = None, "run"
        self._metrics = open(out_dir / "metrics.jsonl", "a") if d.main else None

    def steps(self, total: int, name: str):
        """The steps left, 0-based, behind a progress bar (rank 0's)."""
        from tqdm import tqdm
        self.name = name
        self.bar = tqdm(range(self.start_step, total), desc=name, initial=self.start_step, total=total,
                        disable=not self.d.main)
        for self.step in self.bar:
            yield self.step

    def log(self, row: dict):
        """One row of out_dir/metrics.jsonl (rank 0 writes), with the run id."""
        if self.d.main:
            self._metrics.write(json.dumps(dict(row, run_id=self.run_id)) + "\n")
            self._metrics.flush()

    def save_if_due(self, step: int, total: int, tokenizer, **state):
        """A checkpoint every cfg.save_every steps, and after the last step (it lets --resume extend a run)."""
        if step % self.cfg.save_every == 0 or step == total:
            save_checkpoint(self.out_dir, step, self.model, tokenizer, self.optimizer, self.d,
                            {**state, "step": step, "rng": rng_state(), "run_id": self.run_id,
                             "config": asdict(self.cfg)})

    def finish(self, tokenizer):
        """out_dir/final/, once training is over."""
        if self._metrics:
            self._metrics.close()
        save_final(self.out_dir, self.model, tokenizer, self.d)
        log.info("saved %s", self.out_dir / "final")

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is KeyboardInterrupt:
            saved = latest_checkpoint(self.out_dir)
            logging.getLogger(self.name).warning(
                "interrupted at step %d; the last checkpoint is %s", self.step, saved.name if saved else "none")
        return False


def start_run(cfg, model, d: Dist, device: str, make_optimizer, grad_checkpointing: bool = False) -> Run:
    """Everything between a loaded model and the first step, the same for every trainer: take the output
    folder (cfg.out_dir), resume from its newest checkpoint (cfg.resume) or start it clean, seed every RNG
    (cfg.seed), shard the model and build its optimizer (with the checkpoint's state when resuming), restore
    the RNG state a resumed run had, and write run.json."""
    out_dir = Path(cfg.out_dir)
    lock_out_dir(out_dir, d)
    ckpt, state = start_or_resume(out_dir, cfg.resume, d)
    seed_everything(cfg.seed)
    model, optimizer = ready_to_train(model, ckpt, d, device, make_optimizer, grad_checkpointing)
    if state is not None:
        set_rng_state(state["rng"])
    return Run(cfg, out_dir, d, model, optimizer, state, new_run(out_dir, cfg, state, d))


_locks = {}  # out_dir -> its open lock file: a lock lives as long as this process


def lock_out_dir(out_dir: Path, d: Dist):
    """One run per out_dir: an exclusive flock on out_dir/.lock, released by the kernel when the process ends
    (a process that runs several stages one after another, like pipeline.py, keeps the locks it took)."""
    if not d.main or str(out_dir.resolve()) in _locks:
        return
    import fcntl
    import socket
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / ".lock"
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        raise SystemExit(f"{out_dir} is in use by {holder}. Wait for that run to end, stop it, or choose "
                         "another --out_dir. (The lock dies with its process; "
                         "on a filesystem without working locks, "
                         f"delete {path} once you are sure no run is using the folder.)") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')} "
            f"({' '.join(sys.argv)[:300]})\n")
    f.flush()
    _locks[str(out_dir.resolve())] = f


def code_version() -> str:
    """A hash of the repository's code and toy files: a stage made by other code is not reused."""
    import hashlib
    h = hashlib.sha256()
    files = sorted([*REPO_DIR.glob("*.py"), *REPO_DIR.glob("common/*.py"), *TOY_DIR.glob("*.py"),
                    *TOY_DIR.glob("*.json"), *TOY_DIR.glob("tokenizer/*")])
    for p in files:
        h.update(p.relative_to(REPO_DIR).as_posix().encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


def checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name once it is whole)."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint; the `latest` pointer first, then the newest folder, with a warning if
    they disagree."""
    found = [p for p in checkpoints(out_dir) if (p / "trainer_state.pt").exists()]
    if not found:
        return None
    pointer = out_dir / "latest"
    named = out_dir / pointer.read_text().strip() if pointer.exists() else None
    if named is not None and named != found[-1]:
        log.warning("%s names %s, but the newest complete checkpoint is %s: using that",
                    pointer, named.name, found[-1].name)
    return found[-1]


def start_or_resume(out_dir: Path, resume: bool, d: Dist) -> tuple[Path | None, dict | None]:
    """What a run starts from: (checkpoint folder, its trainer state) or (None, None). Runs on every rank.

    With resume, the newest complete checkpoint; without one, a loud warning naming what the folder holds.
    The JSONL logs are cut back to the checkpoint's step, so that a resumed run writes every step once. A run that
    does not resume starts clean: earlier checkpoints, logs and final/ of this out_dir are removed."""
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None and d.main:
        held = sorted(p.name for p in out_dir.iterdir() if p.name != ".lock") if out_dir.exists() else []
        log.warning("--resume: no complete checkpoint in %s (it holds: %s); starting from step 0",
                    out_dir, ", ".join(held) or "nothing")
    state = torch.load(ckpt / "trainer_state.pt", weights_only=False) if ckpt else None
    barrier(d)
    if d.main:
        for tmp in out_dir.glob(".checkpoint-*.tmp"):  # an interrupted save
            shutil.rmtree(tmp, ignore_errors=True)
        if ckpt is None:
            stale = [p for p in [*checkpoints(out_dir), out_dir / "final", out_dir / "latest"] if p.exists()]
            if stale:
                log.warning("starting fresh in %s: removing %s of an earlier run",
                            out_dir, ", ".join(p.name for p in stale))
            for p in stale:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        trim_logs(out_dir, state["step"] if state else -1)
    barrier(d)
    return ckpt, state


def trim_logs(out_dir: Path, step: int):
    """Keep the rows of every JSONL log of out_dir up to training step `step` (a row's "rl_step" if it has one,
    as the per-turn records of sod_distill.py do, else its "step"); -1 empties them."""
    for path in sorted(out_dir.glob("*.jsonl")):
        keep = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if row.get("rl_step", row.get("step", 0)) <= step:
                keep.append(line + "\n")
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def new_run(out_dir: Path, cfg, state: dict | None, d: Dist) -> str:
    """The run id (kept across resumes), and out_dir/run.json with the settings and the code version."""
    run_id = (state["run_id"] if state and "run_id" in state
              else f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    run_id = all_gather(run_id, d)[0]
    if d.main:
        info = {"run_id": run_id, "code_version": code_version(), "world_size": d.world,
                "cpu_kernels": cpu_kernels.describe(), "config": asdict(cfg)}
        (out_dir / "run.json").write_text(json.dumps(info, indent=1, default=str) + "\n")
    return run_id


def _save_hf(path: Path, model, tokenizer, state_dict: dict):
    # a gathered state dict holds a tied weight twice (the output head is the embedding): keep one, as HF does
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _no_space(e: Exception, where: Path, intact: str):
    """A full disk, also when a library wraps the OSError in its own exception, stops the run saying so."""
    import errno
    wrapped = [f[0] if isinstance(f, tuple) else f for f in getattr(e, "failures", {}).values()]  # per rank
    causes = [e, *wrapped, e.__cause__, e.__context__]
    if any(isinstance(c, OSError) and c.errno == errno.ENOSPC for c in causes):
        raise SystemExit(f"no space left on the device while writing {where}; {intact}") from None
    raise e


def seed_everything(seed: int):
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def ready_to_train(model, ckpt: Path | None, d: Dist, device: str, make_optimizer,
                   grad_checkpointing: bool = False):
    """(model, optimizer) to train: the model (fp32 master weights) sharded over the ranks, its optimizer,
    and, when resuming, the model and optimizer state of checkpoint `ckpt` (saved by any number of ranks)."""
    if grad_checkpointing:
        model.gradient_checkpointing_enable()
    model = shard(model, d, device).train()
    optimizer = make_optimizer(model.parameters())
    if ckpt is not None:
        load_checkpoint(ckpt, model, optimizer, d)
        log.info("resumed from %s", ckpt)
    return model, optimizer


def save_checkpoint(out_dir: Path, step: int, model, tokenizer, optimizer, d: Dist, state: dict):
    """out_dir/checkpoint-{step}: written whole under a temporary name, then renamed; older ones removed
    after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    name = f"checkpoint-{step:06d}"
    tmp, final = out_dir / f".{name}.tmp", out_dir / name
    previous = latest_checkpoint(out_dir)
    intact = f"the last complete checkpoint ({previous.name if previous else 'none yet'}) is intact"
    try:
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(d)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        with single_process_quiet(d):
            dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp / "trainer"),
                     no_dist=d.world == 1)
        weights = full_state_dict(model, d)
        if d.main:
            _save_hf(tmp, model, tokenizer, weights)
            torch.save(state, tmp / "trainer_state.pt")  # written last: its presence marks a complete folder
        barrier(d)
        if d.main:
            shutil.rmtree(final, ignore_errors=True)  # a leftover of a run that was not resumed
            os.replace(tmp, final)                    # the commit point
            pointer = out_dir / ".latest.tmp"
            pointer.write_text(name + "\n")
            os.replace(pointer, out_dir / "latest")
            for old in checkpoints(out_dir)[:-1]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        # torch.distributed.checkpoint wraps a full disk in a CheckpointException (a BaseException)
        _no_space(e, tmp, intact)
    barrier(d)


@contextlib.contextmanager
def single_process_quiet(d: Dist):
    """torch.distributed.checkpoint warns on every save and load of a single process that it assumes a single
    process, which is what no_dist=True says: that one warning is silenced there."""
    with warnings.catch_warnings():
        if d.world == 1:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def load_checkpoint(ckpt: Path, model, optimizer, d: Dist):
    """Model and optimizer state from a checkpoint's trainer/ folder, into a model sharded over any number of
    ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_sd, optim_sd = get_state_dict(model, optimizer)
    sd = {"model": model_sd, "optimizer": optim_sd}
    with single_process_quiet(d):
        dcp.load(sd, checkpoint_id=str(ckpt / "trainer"), no_dist=d.world == 1)
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optimizer"])


def save_final(out_dir: Path, model, tokenizer, d: Dist):
    """out_dir/final: the trained model as a Hugging Face folder, with run.json; written whole, then
    renamed."""
    weights = full_state_dict(model, d)
    if d.main:
        tmp, final = out_dir / ".final.tmp", out_dir / "final"
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            _save_hf(tmp, model, tokenizer, weights)
            if (out_dir / "run.json").exists():
                shutil.copy(out_dir / "run.json", tmp / "run.json")
            # a kill here leaves no final/: the last checkpoint resumes
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:
            _no_space(e, tmp, "the last checkpoint is intact; resume to write final/ again")
    barrier(d)


def optimizer_step(optimizer, model, grad_clip: float, health: Counter) -> float:
    """Clip and step, unless the gradient norm is not finite: then the update is skipped (as verl does) and
    counted; MAX_NONFINITE_IN_A_ROW such steps in a row stop the run. Returns the gradient norm."""
    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip))
    if np.isfinite(grad_norm):
        optimizer.step()
        health["in_a_row"] = 0
    else:
        health["skipped"] += 1
        health["in_a_row"] += 1
        log.warning("gradient norm %s: optimizer step skipped (%d so far)", grad_norm, health["skipped"])
        if health["in_a_row"] >= MAX_NONFINITE_IN_A_ROW:
            raise SystemExit(f"{health['in_a_row']} optimizer steps in a row had a non-finite gradient norm: "
                             "stopping. "
                             "Lower the learning rate, or check the data and the starting checkpoint.")
    optimizer.zero_grad(set_to_none=True)
    return grad_norm

