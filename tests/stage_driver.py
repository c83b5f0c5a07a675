"""Runs a stage the way `python FILE.py` does, under python or torchrun, with two test-only changes:

  - sampling that does not depend on the batch or the rank: each context is decoded alone, seeded by its own
    token ids (and by how many identical contexts came before it in the call, so the n samples of a prompt
    differ). One process and two ranks then roll out the same global batch;
  - SOD_STOP_AFTER_SAVE=k stops the run right after its checkpoint of step k is saved, on every rank.

    python tests/stage_driver.py grpo --model ... --out_dir ...
    torchrun --nproc_per_node=2 tests/stage_driver.py grpo --model ... --out_dir ...
"""
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import evaluate  # noqa: E402
import grpo  # noqa: E402
import rollout  # noqa: E402
import sft  # noqa: E402
import sod_distill  # noqa: E402

real_generate_hf = rollout.generate_hf


def generate_each_context_alone(model, contexts, max_new_tokens, temperature, top_p, stop_ids, pad_id, batch_size=256):
    seen, out = Counter(), []
    for ctx, budget in zip(contexts, max_new_tokens):
        key = tuple(ctx)
        torch.manual_seed(hash((key, seen[key])) % 2**31)
        seen[key] += 1
        out += real_generate_hf(model, [ctx], [budget], temperature, top_p, stop_ids, pad_id)
    return out


rollout.generate_hf = generate_each_context_alone

stop_after = int(os.environ.get("SOD_STOP_AFTER_SAVE", "0"))
real_save = rollout.save_checkpoint


def save_then_maybe_stop(out_dir, step, *args, **kwargs):
    real_save(out_dir, step, *args, **kwargs)
    if step == stop_after:
        raise SystemExit(0)


rollout.save_checkpoint = save_then_maybe_stop

if __name__ == "__main__":
    stage = sys.argv.pop(1)
    main, config = {"sft": (sft.main, sft.Config), "grpo": (grpo.main, grpo.Config), "evaluate": (evaluate.main, evaluate.Config),
                    "sod": (sod_distill.main, sod_distill.Config)}[stage]
    rollout.run_script(main, config)
