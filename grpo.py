"""
grpo.py: stage 2, GRPO with the code-interpreter tool (how the paper's 4B teacher was trained).

One RL step, as the authors' verl fork runs it:
  1. take B prompts and sample n trajectories each with the multi-turn tool loop (rollout.py);
  2. reward each trajectory R_i (tools.compute_score, optional DAPO overlong penalty);
  3. group-normalise within the n samples of a prompt (unbiased std, eps 1e-6; a group of one uses
     mean 0, std 1):   A_i = (R_i - mean_g R) / (std_g R + eps),   A_{i,t} = A_i * m_t
     (m_t = response_mask: 1 on model tokens, 0 on tool-response tokens, which get no gradient);
  4. log-probs of the sampled tokens under the rollout policy, recomputed by the trainer: l_old;
  5. mini-batch PPO updates (reference: 4 mini-batches, 1 epoch) with clip-higher and dual clip:
        rho_t = exp(clamp(l_t - l_old_t, -20, 20))
        L_t   = max(-A_t rho_t, -A_t clip(rho_t, 1 - eps_low, 1 + eps_high))     eps_low 0.2, eps_high 0.28
        L_t   = min(L_t, -c A_t)  where A_t < 0                                   c = 3 (dual clip)
        loss  = sum_t m_t L_t / sum_t m_t                                         (token mean)
  6. push the new weights into the generation engine (vLLM) and log.
Every log-prob (l_old, l, the teacher's in sod_distill.py) is taken at the sampling temperature,
log softmax(logits / T), as the reference does. There is no critic and, as in the reference, no KL
term (--kl_coef adds one to a frozen copy of the starting checkpoint, with the k3 estimator).

`train` is the one RL loop of this repository. sod_distill.py runs it too and changes a single thing,
the per-token advantages of step 3, through the `advantages_fn` seam: everything else (dynamic
sampling, KL, evaluation, checkpoints, the vLLM weight push) is the same code for GRPO and every
distillation mode.

Many processes (torchrun): each rank rolls out whole GRPO groups of its share of the step's prompts, every
rank then holds the global batch, each PPO mini-batch is split over the ranks, and the student is sharded
with FSDP2 (docs/distributed.md). With one process none of it runs.

Deviations from the reference (docs/deviations.md, rows 8, 18 and 24): the token mean runs over the whole
mini-batch and all ranks (verl, with its dynamic batch size, takes each micro-batch's token mean and scales it
by the micro-batch's share of the mini-batch's sequences); prompt wrappers are chosen per row (theirs per
file: --wrapper_choice file); the mini-batches hold whole GRPO groups in prompt order, where verl reorders the
step by length first.

Reference values (real models): lr 1e-6 constant, AdamW (0.9, 0.999), wd 0.01, clip 1.0, 64 prompts x 16
samples, 4 mini-batches, T = 1.0, top_p = 1.0, 16 turns, 20480 response tokens, overlong buffer 1024.

    python grpo.py                                    # toy teacher from runs/sft-teacher/final, CPU, ~2 min
    torchrun --nproc_per_node=2 grpo.py               # the same on two ranks
    python grpo.py --model runs/sft-4b/final --data Open-AgentRL-30K.parquet --backend vllm \\
        --out_dir runs/grpo-4b --steps 470 --prompts_per_step 64 --n_samples 16 --lr 1e-6 \\
        --max_prompt_tokens 2560 --max_response_tokens 20480 --overlong_buffer 1024 --micro_batch_size 4 \\
        --eval_data aime_2024_problems.parquet,aime_2025_problems.parquet --tool_junction reference
"""
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

import evaluate
import rollout
import tools
from common import chat_template, dist, engines, models, runs
from common.cli import arg, reject_unused, run_script
from common.data import drop_long_prompts, load_rows, write_jsonl

log = logging.getLogger("grpo")


@dataclass
class Config(rollout.RolloutConfig):
    """GRPO with tools (the teacher's RL stage)."""
    # model and data
    model: str = arg("runs/sft-teacher/final", "starting checkpoint (the SFT model)")
    data: str = arg("toy", "'toy' or an RL .parquet/.jsonl (prompt, data_source, reward_model)")
    toy_prompts: int = arg(2048, "size of the generated toy RL set (with --data toy)")
    toy_steps: str = arg("2-4", "toy problems need this many dependent tool calls (from 1 to 8)")
    # RL
    steps: int = arg(30, "RL steps (reference: one epoch of 30K prompts / 64 = ~470)")
    prompts_per_step: int = arg(16, "prompts per step (reference 64)")
    n_samples: int = arg(8, "samples per prompt, the GRPO group n (reference 16)")
    dynamic_sampling: bool = arg(False, "drop groups of two or more whose rewards are all equal (DAPO), unless "
                                        "that drops every group; reference off")
    # optimization
    lr: float = arg(5e-5, "learning rate, constant (reference 1e-6)")
    beta2: float = arg(0.999, "AdamW beta2 (beta1 0.9)")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    grad_clip: float = arg(1.0, "max gradient norm")
    mini_batches: int = arg(4, "optimizer steps per RL step (reference 4)")
    ppo_epochs: int = arg(1, "passes over the rollouts (reference 1)")
    micro_batch_size: int = arg(64, "trajectories per forward pass")
    clip_low: float = arg(0.2, "PPO clip, lower")
    clip_high: float = arg(0.28, "PPO clip, upper (clip-higher)")
    clip_c: float = arg(3.0, "dual clip constant for negative advantages")
    kl_coef: float = arg(0.0, "k3 KL penalty to the starting checkpoint (reference 0: off)")
    # run
    out_dir: str = arg("runs/grpo-teacher", "checkpoints, metrics.jsonl, trajectories.jsonl, final/")
    eval_every: int = arg(10, "held-out evaluation every N steps (0: only at the end; -1: none, not even "
                              "--eval_before_train's)")
    eval_before_train: bool = arg(True, "evaluate the starting checkpoint first, logged as step 0 "
                                        "(verl's val_before_train)")
    eval_data: str = arg("toy:valid", "data of the evaluations during training: 'toy:valid' (the toy "
                                      "validation split), 'toy' (its test split) or comma-separated "
                                      "eval files")
    eval_prompts: int = arg(64, "held-out problems per evaluation")
    eval_n: int = arg(4, "samples per held-out problem")
    save_every: int = arg(10, "checkpoint every N steps")
    resume: bool = arg(False, "continue from out_dir/checkpoint")
    seed: int = arg(0, "random seed")
    device: str = arg("", "cpu or cuda (empty: cuda if available)")


# -----------------------------------------------------------------------------
# ALGO LOGIC: the two equations of GRPO, and the optional KL penalty

def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """A_i = (R_i - mean_g) / (std_g + eps) within each group; unbiased std; a group of one: mean 0, std 1.
    rewards, group_ids: [B] -> [B]. Vectorised with scatter-adds over the groups."""
    _, g = torch.unique(group_ids, return_inverse=True)                       # [B] group index 0..G-1
    G = int(g.max()) + 1 if g.numel() else 0
    r = rewards.double()
    count = torch.zeros(G, dtype=torch.float64).index_add_(0, g, torch.ones_like(r))   # [G]
    mean = torch.zeros(G, dtype=torch.float64).index_add_(0, g, r) / count
    sq_dev = torch.zeros(G, dtype=torch.float64).index_add_(0, g, (r - mean[g]) ** 2)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()                          # unbiased (n - 1)
    single = count == 1
    mean, std = mean.masked_fill(single, 0.0), std.masked_fill(single, 1.0)
    return ((r - mean[g]) / (std[g] + eps)).to(rewards.dtype)


def policy_loss(logprobs, old_logprobs, advantages, response_mask, clip_low=0.2, clip_high=0.28, clip_c=3.0,
                num_tokens: float | None = None):
    """PPO-clip with clip-higher and dual clip, token-mean. All inputs [B, T] (advantages per token, so SOD
    can pass its own). `num_tokens` lets a caller divide by the token count of a whole mini-batch when it
    feeds micro-batches; by default the mean is over this call's masked tokens."""
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)
    ratio = torch.exp(log_ratio)                                                 # [B, T]
    loss_unclipped = -advantages * ratio
    loss_clipped = -advantages * ratio.clamp(1 - clip_low, 1 + clip_high)
    loss_ppo = torch.maximum(loss_unclipped, loss_clipped)
    loss_dual = torch.minimum(loss_ppo, -advantages * clip_c)                    # bounds the loss when A < 0
    loss_t = torch.where(advantages < 0, loss_dual, loss_ppo)                    # [B, T]
    denom = response_mask.sum() if num_tokens is None else num_tokens
    loss = (loss_t * response_mask).sum() / max(float(denom), 1e-8)
    with torch.no_grad():
        m = response_mask
        stats = {"clip_frac": rollout.masked_mean((loss_clipped > loss_unclipped).float(), m).item(),
                 "dual_clip_frac": rollout.masked_mean(((loss_ppo > -advantages * clip_c)
                                                        & (advantages < 0)).float(), m).item(),
                 "approx_kl": rollout.masked_mean(-log_ratio, m).item(),
                 "ratio_max": ratio[m > 0].max().item() if m.any() else 1.0,
                 "ratio_min": ratio[m > 0].min().item() if m.any() else 1.0}
    return loss, stats


def kl_penalty(logprobs, ref_logprobs, response_mask, num_tokens: float):
    """k3 estimator of KL(pi || pi_ref), exp(d) - d - 1 >= 0 with d = l_ref - l, token-mean.
    [B, T] -> scalar."""
    d = ref_logprobs - logprobs
    return ((torch.exp(d) - d - 1) * response_mask).sum() / max(float(num_tokens), 1e-8)


# -----------------------------------------------------------------------------
# Pieces of the RL step

@torch.no_grad()
def batched_logprobs(model, batch: rollout.Batch, micro_batch_size: int, temperature: float,
                     with_entropy: bool = False, forward_passes: int | None = None):
    """token_logprobs over a batch in micro-batches, no grad: [B, T-1] (and the [B, T-1] entropies if asked).
    A sharded model must run `forward_passes` forwards on every rank: the extra ones run on row 0 and are
    dropped."""
    B = batch.input_ids.shape[0]
    count = forward_passes or dist.n_micro_batches(B, micro_batch_size)
    parts = []
    for rows in dist.micro_batches(list(range(B)), micro_batch_size, count):
        out = rollout.token_logprobs(model, batch.input_ids[rows or [0]],
                                     batch.attention_mask[rows or [0]], temperature,
                                     with_entropy=with_entropy)
        if rows:
            parts.append(out)
    if with_entropy:  # (logprobs, entropy) pairs
        logprobs, entropy = zip(*parts)
        return torch.cat(logprobs), torch.cat(entropy)
    return torch.cat(parts)


def ppo_update(model, optimizer, batch: rollout.Batch, advantages, old_logprobs, ref_logprobs, minibatches, cfg, d,
               health) -> dict:
    """cfg.ppo_epochs passes of one optimizer step per mini-batch. advantages, old_logprobs: [B, T-1] of this
    rank's rows. minibatches: per mini-batch (this rank's rows, the mini-batch's token count over all ranks,
    forward passes)."""
    mask = batch.response_mask
    stats, extremes = Counter(), {}
    n_updates = 0
    for _ in range(cfg.ppo_epochs):
        # in order, no shuffle; the reference first reorders the step by length (docs/deviations.md row 24)
        for rows, mb_tokens, passes in minibatches:
            for micro in dist.micro_batches(rows, cfg.micro_batch_size, passes):
                idx = torch.as_tensor(micro or rows[:1])
                m = mask[idx] * bool(micro)   # an empty turn of a short rank: a forward with nothing to learn
                logprobs = rollout.token_logprobs(model, batch.input_ids[idx],
                                                  batch.attention_mask[idx], cfg.temperature)  # [b, T-1]
                loss, st = policy_loss(logprobs, old_logprobs[idx], advantages[idx], m,
                                       cfg.clip_low, cfg.clip_high, cfg.clip_c, num_tokens=mb_tokens)
                if ref_logprobs is not None:
                    loss = loss + cfg.kl_coef * kl_penalty(logprobs, ref_logprobs[idx], m, mb_tokens)
                # FSDP averages gradients over ranks: x world makes the average a sum
                (loss * d.world).backward()
                w = m.sum().item() / max(mb_tokens, 1)
                for k in ("clip_frac", "dual_clip_frac", "approx_kl"):   # token means over the mini-batch
                    stats[k] += st[k] * w
                if micro:
                    extremes["ratio_max"] = max(extremes.get("ratio_max", 1.0), st["ratio_max"])
                    extremes["ratio_min"] = min(extremes.get("ratio_min", 1.0), st["ratio_min"])
                stats["loss"] += loss.item()
            stats["grad_norm"] += runs.optimizer_step(optimizer, model, cfg.grad_clip, health)
            n_updates += 1
    grad_norm = stats.pop("grad_norm", 0.0)  # already the same on every rank
    stats = dist.all_sum(dict(stats), d)
    every = dist.all_gather(extremes, d)
    return {**{k: v / max(n_updates, 1) for k, v in stats.items()},
            "grad_norm": grad_norm / max(n_updates, 1),
            "ratio_max": max(e.get("ratio_max", 1.0) for e in every),
            "ratio_min": min(e.get("ratio_min", 1.0) for e in every), "skipped_updates": health["skipped"]}


def load_rl_prompts(cfg, tokenizer) -> list[dict]:
    """RL prompts, the over-long ones dropped (measured as the reference measures them)."""
    data = "toy:train" if cfg.data == "toy" else cfg.data
    prompts = rollout.load_prompts(data, cfg.toy_prompts if cfg.data == "toy" else None, seed=cfg.seed,
                           toy_steps=cfg.toy_steps, wrapper_choice=cfg.wrapper_choice)
    kept = drop_long_prompts(prompts, tokenizer, cfg.max_prompt_tokens, name=data)
    if len(kept) < cfg.prompts_per_step:
        raise SystemExit(f"{data}: {len(kept)} of {len(prompts)} prompts fit in --max_prompt_tokens "
                         f"{cfg.max_prompt_tokens}, fewer than --prompts_per_step {cfg.prompts_per_step}")
    return kept


def prompts_for_step(prompts: list[dict], step: int, per_step: int, seed: int) -> list[dict]:
    """A pure function of (seed, step): a resumed run sees the same prompts (epochs reshuffle, drop_last)."""
    per_epoch = max(1, len(prompts) // per_step)
    epoch, k = divmod(step, per_epoch)
    order = np.random.RandomState(seed + epoch).permutation(len(prompts))
    return [prompts[i] for i in order[k * per_step:(k + 1) * per_step]]


def dynamic_sampling_keep(rewards: torch.Tensor, group_ids: torch.Tensor) -> list[int]:
    """DAPO's filter as the authors run it (verl/trainer/ppo/ray_trainer.py: _apply_filter_groups): the
    trajectories of groups whose rewards are not all equal, and of groups of one (whose advantage is their
    reward, mean 0 and std 1); a step where no group would be kept keeps them all."""
    keep = []
    for i, g in enumerate(group_ids.tolist()):
        group = rewards[group_ids == g]
        if len(group) == 1 or group.std().item() > 0:
            keep.append(i)
    return keep or list(range(len(group_ids)))


def rollout_metrics(trajs: list, counts: Counter) -> dict:
    n = len(trajs)
    return {"reward": sum(t.reward for t in trajs) / n, "acc": sum(t.acc for t in trajs) / n,
            "response_tokens": sum(len(t.response_ids) for t in trajs) / n,
            "turns": sum(t.num_turns for t in trajs) / n,
            "tool_calls": sum(t.num_tool_calls for t in trajs) / n,
            "no_tool_frac": sum(t.num_tool_calls == 0 for t in trajs) / n,
            "tool_error_rate": counts["tool_errors"] / max(1, counts["tool_calls"]),
            "dropped_tool_calls": counts["tool_calls_dropped"]}


def held_out_eval(model, tokenizer, cfg, engine, d) -> dict:
    """avg@n and pass@n on held-out problems through evaluate.py, at evaluate.py's sampling settings
    (T = 1.0, top_p = 0.6). Generation goes through the rollout engine (vLLM holds the pushed weights)."""
    settings = rollout.rollout_settings(cfg, temperature=evaluate.Config.temperature,
                                        top_p=evaluate.Config.top_p)
    eval_cfg = evaluate.Config(**asdict(settings), data=cfg.eval_data, num_prompts=cfg.eval_prompts,
                               n_samples=cfg.eval_n, toy_steps=cfg.toy_steps, seed=1234)
    model.eval()
    results = evaluate.evaluate_engine(engine, tokenizer, evaluate.load_benchmarks(eval_cfg), eval_cfg, d)
    model.train()
    return {f"eval/{b}/{k}": v for b, r in results.items() for k, v in r.items() if "@" in k}


def report_start_and_end(metrics_path: Path, name: str) -> None:
    """One log line with the held-out avg@n of the first and the last evaluation of the run."""
    evals = [r for r in map(json.loads, open(metrics_path)) if any("avg@" in k for k in r)]
    if evals:
        first, last = evals[0], evals[-1]
        for k in (k for k in last if "avg@" in k):
            logging.getLogger(name).info("held-out %s: %.4f (step %d) -> %.4f (step %d)", k,
                                         first.get(k, float("nan")), first["step"], last[k], last["step"])


def check_inputs(cfg, start: str):
    """Everything a run reads, checked before anything is written."""
    if cfg.eval_every < -1:
        raise SystemExit(f"--eval_every must be -1 (none), 0 (at the end) or a step count, not {cfg.eval_every}")
    if cfg.eval_every == -1:
        reject_unused(cfg, ["eval_data", "eval_prompts", "eval_n"], "with --eval_every -1 (no evaluation)")
    if cfg.data != "toy":
        reject_unused(cfg, ["toy_prompts", "toy_steps"], "with --data other than toy")
        load_rows(cfg.data)
    for path in ([] if cfg.eval_data.startswith("toy") else cfg.eval_data.split(",")):
        load_rows(path.strip())
    models.check_model_path(start)
    rollout.check_rollout_settings(cfg)


def rollout_groups(model, engine, tokenizer, step_prompts: list[dict], cfg, step: int, d) -> tuple[list, dict]:
    """Steps 1-2: n trajectories with the tool for each prompt, and their rewards. Each rank rolls out whole
    GRPO groups of its share of the prompts; every rank then holds all trajectories, in prompt order.
    Returns (trajectories, the step's metrics row so far)."""
    t0 = time.time()
    share = dist.my_share(len(step_prompts), d)
    counts = Counter()
    model.eval()
    mine = rollout.rollout(engine, tokenizer, step_prompts[share.start:share.stop], cfg.n_samples, cfg,
                           seed=cfg.seed * 100_003 + step, counts=counts, first_prompt=share.start)
    model.train()
    trajs = [t for part in dist.all_gather(mine, d) for t in part]
    counts = Counter(dist.all_sum(dict(counts), d))
    return trajs, {"step": step + 1, **rollout_metrics(trajs, counts), "t_rollout": time.time() - t0,
                   "t_tools": counts["tool_seconds"]}


def generation_engine(cfg, start: str, model, d, device: str, resumed: bool):
    """What rolls out: vLLM, or the trained model itself (a plain replica of it when the model is sharded),
    holding the trained weights from the first step on."""
    if engines.resolve_backend(cfg.backend) == "vllm":
        engine = engines.make_vllm_engine(start, cfg.max_prompt_tokens + cfg.max_response_tokens,
                                          seed=cfg.seed + d.rank, d=d, kv_cache_gb=cfg.vllm_kv_cache_gb)
    else:
        engine = model if d.world == 1 else models.load_model(start, device=device, dtype=torch.float32)
    if engine is not model and (resumed or d.world > 1):
        engines.push_weights(engine, model, d)
    return engine


# -----------------------------------------------------------------------------
# The RL loop

def train(cfg, start: str, advantages_fn=None, name: str = "grpo"):
    """RL from checkpoint `start`, the steps of this file's docstring. The one seam: advantages_fn(prompts,
    trajs, batch, old_logprobs, grpo_adv, step) returns the per-token advantages [B, T-1] that PPO optimises
    and a dict of metrics for the step's row. Without it this is GRPO: A_{i,t} = A_i m_t."""
    check_inputs(cfg, start)
    tools.setup_sandbox(cfg, cfg.data, cfg.eval_data)
    d, device = dist.init_processes(cfg.device)  # torchrun: one process per GPU (or CPU rank)
    tokenizer = models.load_tokenizer(start, cfg.chat_template)
    chat_template.check_declares_tool(tokenizer, tools.TOOL_SCHEMA, start)  # before anything is written
    prompts = load_rl_prompts(cfg, tokenizer)
    model = models.load_model(start, device=device, dtype=torch.float32, seed=cfg.seed)  # fp32 master weights
    run = runs.start_run(cfg, model, d, device, make_optimizer=lambda params: torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=cfg.weight_decay))
    model = run.model
    # the KL anchor is the starting checkpoint, also when resuming; frozen models are replicated on every rank
    ref_model = models.load_model(start, device=device).requires_grad_(False) if cfg.kl_coef > 0 else None
    engine = generation_engine(cfg, start, model, d, device, resumed=run.state is not None)
    if cfg.eval_before_train and cfg.eval_every >= 0 and run.start_step == 0:  # the starting checkpoint: step 0
        row = {"step": 0, **held_out_eval(model, tokenizer, cfg, engine, d)}
        run.log(row)
        log.info("held-out before training: %s", {k: round(v, 4) for k, v in row.items() if "avg@" in k})
    with run:
        for step in run.steps(cfg.steps, name):
            # 1-2. rollouts with the tool, and their rewards
            step_prompts = prompts_for_step(prompts, step, cfg.prompts_per_step, cfg.seed)
            trajs, row = rollout_groups(model, engine, tokenizer, step_prompts, cfg, step, d)
            rewards = torch.tensor([t.reward for t in trajs])                            # [B]
            group_ids = torch.tensor([t.prompt_index for t in trajs])                    # [B]
            # 3. group-normalised advantages (with dynamic sampling, only the groups that carry signal)
            grpo_adv = group_advantages(rewards, group_ids)                              # [B]
            keep = (dynamic_sampling_keep(rewards, group_ids) if cfg.dynamic_sampling
                    else list(range(len(trajs))))
            keep = keep if len(keep) >= d.world else []  # too few to give every rank a row: no update
            row["kept_trajectories"] = len(keep)
            if keep:
                # PPO mini-batches over the kept trajectories, in order; this rank's rows of each
                local, passes, layout = dist.minibatch_layout([sum(trajs[i].response_mask) for i in keep],
                                                              cfg.mini_batches, cfg.micro_batch_size, d)
                kept = [trajs[keep[i]] for i in local]
                batch = rollout.pad_trajectories(kept, tokenizer.pad_token_id, device, positions=local)
                mask = batch.response_mask                                            # [b, T-1]
                # 4. old log-probs of the sampled tokens (no grad), at the sampling temperature
                t1 = time.time()
                old_logprobs, entropy = batched_logprobs(model, batch, cfg.micro_batch_size, cfg.temperature,
                                                         with_entropy=True, forward_passes=passes)
                ent = dist.all_sum({"sum": (entropy * mask).sum().item(), "tokens": mask.sum().item()}, d)
                row["entropy"] = ent["sum"] / max(ent["tokens"], 1)  # of the rollout policy on its own tokens
                ref_logprobs = (batched_logprobs(ref_model, batch, cfg.micro_batch_size, cfg.temperature)
                                if ref_model else None)
                # 3'. THE SEAM: per-token advantages, A_i m_t for GRPO, plus the teacher's signal in SOD
                adv = grpo_adv[[keep[i] for i in local]].to(device)                     # [b]
                advantages, extra = ((adv[:, None] * mask, {}) if advantages_fn is None else
                                     advantages_fn(step_prompts, kept, batch, old_logprobs, adv, step + 1))
                row.update(extra, t_advantages=time.time() - t1)
                # 5. PPO updates; each mini-batch's token mean is over all its rows, on every rank
                t2 = time.time()
                row.update(ppo_update(model, run.optimizer, batch, advantages, old_logprobs, ref_logprobs,
                                      layout, cfg, d, run.health))
                row["t_train"] = time.time() - t2
                # 6. the generation engine gets the new weights
                if engine is not model:
                    engines.push_weights(engine, model, d)
            if cfg.eval_every >= 0 and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0)
                                        or step + 1 == cfg.steps):
                row.update(held_out_eval(model, tokenizer, cfg, engine, d))
            run.log(row)
            if d.main:
                write_jsonl(run.out_dir / "trajectories.jsonl",
                            [dict(t.log_record(), step=step + 1) for t in trajs[:cfg.n_samples * 2]])
            run.bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}")
            run.save_if_due(step + 1, cfg.steps, tokenizer, start=start)
    run.finish(tokenizer)
    if d.main:
        report_start_and_end(run.out_dir / "metrics.jsonl", name)
    return model


def main(cfg: Config):
    return train(cfg, cfg.model)


if __name__ == "__main__":
    run_script(main, Config)
