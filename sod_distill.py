"""
sod_distill.py: stage 3, step-wise on-policy distillation (SOD) of a small student with tools.

SOD is GRPO (grpo.py) plus a teacher signal on every token the student generated. The student rolls
out with the tool; a frozen teacher scores the *same token ids* (tool responses are context for it,
but carry no signal); the per-token signal is the teacher-student log-prob gap

    r_t = (l^T_t - l^S_t) * m_t,        l^S = log pi_old(y_t | .),  l^T = log pi_teacher(y_t | .)

(minus a one-sample estimate of the reverse KL at t). Plain on-policy distillation (OPD) adds r_t to
the GRPO advantage everywhere. SOD first asks, per assistant turn ("step") k, how far the student has
drifted from what the teacher would do,

    d_k = mean_{t in step k} |l^S_t - l^T_t|,

and turns the teacher down on steps that drifted more than the first one did:

    w_1 = 1,   w_k = min( (d_1 + eps) / (d_k + eps), 1 + delta ),
    A_t = A_grpo * m_t + lambda * w_{k(t)} * r_t,

then feeds A_t to grpo.policy_loss unchanged. After a bad tool call the context holds something the
teacher rarely saw (a traceback), its advice there is poor, d_k grows and w_k shrinks.

The reference writes w_k as a running product, w_k = min(prod_{u=1}^{k-1} (d_u+eps)/(d_{u+1}+eps), 1+delta),
with the clip applied outside the product. The product telescopes: each (d_u + eps) in a numerator
cancels the same term in the previous factor's denominator, leaving (d_1 + eps)/(d_k + eps). So every
step is compared with the first one only, and there is no lower bound (w -> 0 as d_k grows).

Modes (--mode): sod (default); opd (w = 1, the OPD baseline); gated (section 6.5: A_t = (A_i + beta_i r_t) m_t,
beta_i = beta_min + (beta_max - beta_min) sigmoid(-gamma A_i)); opsd_gt / opsd_hint (on-policy *self*-
distillation: the teacher is the frozen starting student, shown the ground-truth answer or a hint in its
prompt, with uniform weights as in OPD. The reference has no code for these; this definition is inferred
from the paper it cites).

Deviations from the reference: step_weights is vectorised (the reference loops over tokens with .item());
the rest follows grpo.py. Reference values: eps 1e-6, delta 0.2, lambda 1.0 (the dataclass default
delta = 0.5 of the reference code is not what its SOD script runs).

    python sod_distill.py                                   # toy student, teacher runs/grpo-teacher/final, CPU
    python sod_distill.py --mode opd --out_dir runs/opd-student
    python sod_distill.py --student runs/sft-0.6b/final --teacher youngzhong/SOD-GRPO_teacher-4B \\
        --data Open-AgentRL-30K.parquet --backend vllm --steps 470 --prompts_per_step 64 --n 16 --lr 1e-6 \\
        --max_response_tokens 20480 --overlong_buffer 1024 --micro_batch_size 4 --teacher_offload true
"""
import copy
import json
import logging
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import grpo
import rollout
import sft
from rollout import arg

log = logging.getLogger("sod")


@dataclass
class Config(grpo.Config):
    """Step-wise on-policy distillation: GRPO plus a per-step weighted teacher signal."""
    student: str = arg("runs/sft-student/final", "the student's starting checkpoint (its SFT model)")
    teacher: str = arg("runs/grpo-teacher/final", "the frozen teacher (ignored by opsd_* modes)")
    mode: str = arg("sod", "sod | opd | gated | opsd_gt | opsd_hint")
    coef: float = arg(1.0, "lambda, weight of the teacher signal (reference 1.0)")
    eps: float = arg(1e-6, "epsilon in the step weights (reference 1e-6)")
    delta: float = arg(0.2, "weights are capped at 1 + delta (reference 0.2)")
    gated_gamma: float = arg(1.0, "gated mode: gamma")
    gated_beta_min: float = arg(0.0, "gated mode: beta_min")
    gated_beta_max: float = arg(0.1, "gated mode: beta_max")
    teacher_offload: bool = arg(False, "keep the teacher on CPU between steps (GPU memory)")
    # grpo.Config fields whose default differs for the student
    model: str = arg("", "unused here: the student is --student")
    out_dir: str = arg("runs/sod-student", "checkpoints, metrics.jsonl, steps.jsonl, step_weights.png, final/")


# -----------------------------------------------------------------------------
# ALGO LOGIC: steps, divergences and weights, vectorised over [B, T]

def step_index(response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] long: k (1-based) for tokens of the k-th maximal run of mask 1, 0 elsewhere."""
    m = response_mask > 0
    starts = m & ~torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)   # a run starts where the previous token is not in one
    return torch.cumsum(starts.long(), dim=1) * m.long()


def step_divergence(student_logprobs, teacher_logprobs, response_mask):
    """d[b, k] = mean |l^S - l^T| over step k of row b (column 0 unused). Returns (step_id [B, T], d [B, K+1], sizes [B, K+1])."""
    step_id = step_index(response_mask)                                              # [B, T]
    B, K = step_id.shape[0], int(step_id.max()) + 1 if step_id.numel() else 1
    flat = (torch.arange(B, device=step_id.device)[:, None] * K + step_id).reshape(-1)  # [B*T] slot per (row, step)
    gap = (student_logprobs - teacher_logprobs).abs().double().reshape(-1) * (step_id.reshape(-1) > 0)
    sums = torch.zeros(B * K, dtype=torch.float64, device=gap.device).index_add_(0, flat, gap).view(B, K)
    sizes = torch.zeros(B * K, dtype=torch.float64, device=gap.device).index_add_(0, flat, (step_id.reshape(-1) > 0).double()).view(B, K)
    return step_id, sums / sizes.clamp(min=1), sizes


def step_weights(student_logprobs, teacher_logprobs, response_mask, eps: float = 1e-6, delta: float = 0.2) -> torch.Tensor:
    """w per token [B, T]: tokens of step k get min((d_1 + eps) / (d_k + eps), 1 + delta), w_1 = 1, non-step tokens 0."""
    step_id, d, _ = step_divergence(student_logprobs, teacher_logprobs, response_mask)
    w = ((d[:, 1:2] + eps) / (d + eps)).clamp(max=1 + delta)                          # [B, K+1]
    w[:, 1] = 1.0
    return torch.gather(w, 1, step_id).to(student_logprobs.dtype) * (step_id > 0)    # [B, T]


def distill_advantages(mode: str, grpo_adv, student_logprobs, teacher_logprobs, response_mask, cfg):
    """The advantage each mode feeds to grpo.policy_loss. grpo_adv: [B]; the rest [B, T]."""
    m = response_mask
    r = (teacher_logprobs - student_logprobs) * m                                    # [B, T] per-token teacher signal
    if mode == "sod":
        w = step_weights(student_logprobs, teacher_logprobs, m, cfg.eps, cfg.delta)
    elif mode in ("opd", "opsd_gt", "opsd_hint"):  # uniform: the OPD baseline, and self-distillation with a privileged teacher
        w = m
    elif mode == "gated":
        beta = cfg.gated_beta_min + (cfg.gated_beta_max - cfg.gated_beta_min) * torch.sigmoid(-cfg.gated_gamma * grpo_adv)
        return (grpo_adv[:, None] + beta[:, None] * r) * m, r, m
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return grpo_adv[:, None] * m + cfg.coef * w * r, r, w


# -----------------------------------------------------------------------------
# The teacher's view: the same response ids, behind the student's prompt or a privileged one

def privileged_prompt(prompt: dict, mode: str) -> str:
    """opsd_* teachers see extra text in the user turn (inferred definition, see the docstring)."""
    if mode == "opsd_gt":
        return prompt["prompt"] + f"\n(The correct final answer is {prompt['ground_truth']}.)"
    hint = prompt.get("hint")
    if hint is None and prompt["data_source"].startswith("toy"):
        # the toy hint: the value of the first line, e.g. "a = 57 * 26" -> "a = 1482"
        first = next(line for line in prompt["prompt"].split("\n") if line.startswith("a = "))
        x, op, y = first.split("=")[1].split()
        hint = f"a = {rollout._apply(op, int(x), int(y))}"
    if hint is None:
        raise ValueError("opsd_hint needs a `hint` field in the data rows")
    return prompt["prompt"] + f"\n(Hint: {hint}.)"


@torch.no_grad()
def teacher_logprobs_for(teacher, tokenizer, trajs, batch, prompts, cfg) -> torch.Tensor:
    """l^T on the student's response tokens, in the student batch's [B, T-1] label layout."""
    if cfg.mode in ("sod", "opd", "gated"):
        return grpo.batched_logprobs(teacher, batch, cfg.micro_batch_size)  # the very same input ids
    teacher_trajs = [copy.copy(t) for t in trajs]
    for t in teacher_trajs:
        t.prompt_ids = rollout.render_prompt_ids(tokenizer, privileged_prompt(prompts[t.prompt_index], cfg.mode))
    tb = rollout.pad_trajectories(teacher_trajs, tokenizer.pad_token_id, batch["input_ids"].device)
    lp = grpo.batched_logprobs(teacher, tb, cfg.micro_batch_size)
    out = torch.zeros_like(batch["response_mask"])
    for b, (s, t) in enumerate(zip(trajs, teacher_trajs)):  # move each response's slice to the student's positions
        n = len(s.response_ids)
        out[b, len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + n] = lp[b, len(t.prompt_ids) - 1:len(t.prompt_ids) - 1 + n]
    return out


# -----------------------------------------------------------------------------
# Diagnostics: per-step records, a per-RL-step summary, a picture

def step_records(trajs, step_id, d, w, rl_step) -> list[dict]:
    """One record per (trajectory, assistant turn): tokens, d_k, w_k, the tool call and its status, reward."""
    w_step = torch.zeros_like(d)
    w_step.scatter_reduce_(1, step_id, w.double(), reduce="amax", include_self=False)  # w is constant on a step
    records = []
    for b, t in enumerate(trajs):
        for k, turn in enumerate(t.turns[:len(t.steps)], start=1):
            records.append({"rl_step": rl_step, "traj": b, "step": k, "tokens": turn["tokens"], "d": d[b, k].item(),
                            "w": w_step[b, k].item(), "tool_call": turn.get("tool_call"), "tool_status": turn.get("tool_status"),
                            "after_tool_error": any(x.get("tool_status") == "error" for x in t.turns[:k - 1]),
                            "reward": t.reward})
    return records


def summarize_steps(records: list[dict]) -> dict:
    by_k = defaultdict(list)
    for r in records:
        by_k[r["step"]].append(r)
    out = {f"w_mean/step{k}": float(np.mean([r["w"] for r in rs])) for k, rs in sorted(by_k.items()) if k <= 8}
    out.update({f"d_mean/step{k}": float(np.mean([r["d"] for r in rs])) for k, rs in sorted(by_k.items()) if k <= 8})
    later = [r for r in records if r["step"] > 1]
    out["frac_w_below_0.5"] = float(np.mean([r["w"] < 0.5 for r in later])) if later else 0.0
    out["d1_mean"] = float(np.mean([r["d"] for r in by_k[1]])) if by_k[1] else 0.0
    after = [r for r in later if r["after_tool_error"]]
    clean = [r for r in later if not r["after_tool_error"]]
    out["d_after_tool_error"] = float(np.mean([r["d"] for r in after])) if after else None
    out["d_no_tool_error"] = float(np.mean([r["d"] for r in clean])) if clean else None
    out["w_after_tool_error"] = float(np.mean([r["w"] for r in after])) if after else None
    out["w_no_tool_error"] = float(np.mean([r["w"] for r in clean])) if clean else None
    return out


def plot_steps(metrics_path: Path, png_path: Path):
    """w_k and d_k against step index k, one line per point in training. Needs matplotlib (optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s (pip install matplotlib)", png_path.name)
        return
    rows = [json.loads(line) for line in open(metrics_path)]
    rows = [r for r in rows if "w_mean/step1" in r]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    cmap = plt.get_cmap("viridis")
    for i, r in enumerate(rows[:: max(1, len(rows) // 8)]):
        ks = sorted(int(k.split("step")[1]) for k in r if k.startswith("w_mean/step"))
        color = cmap(i / 8)
        axes[0].plot(ks, [r[f"w_mean/step{k}"] for k in ks], marker="o", color=color, label=f"RL step {r['step']}")
        axes[1].plot(ks, [r[f"d_mean/step{k}"] for k in ks], marker="o", color=color)
    axes[0].set(xlabel="assistant turn k", ylabel="mean w_k", title="step weights")
    axes[1].set(xlabel="assistant turn k", ylabel="mean d_k = mean |l_S - l_T|", title="step divergence")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)


# -----------------------------------------------------------------------------

def main(cfg: Config):
    device, out_dir, tokenizer, model, optimizer, engine, start_step = grpo.setup_run(cfg, cfg.student)
    if cfg.mode.startswith("opsd"):
        teacher = rollout.load_model(cfg.student, device=device)            # frozen copy of the starting student
    else:
        rollout.check_same_tokenizer(tokenizer, rollout.load_tokenizer(cfg.teacher), cfg.student, cfg.teacher)
        teacher = rollout.load_model(cfg.teacher, device=device)            # bf16 on GPU, fp32 on CPU
    teacher.requires_grad_(False)
    teacher_home = "cpu" if cfg.teacher_offload else device
    teacher.to(teacher_home)
    prompts = grpo.load_rl_prompts(cfg, tokenizer)
    metrics_file = open(out_dir / "metrics.jsonl", "a")
    grpo.eval_before_training(model, tokenizer, cfg, engine, metrics_file, start_step)
    from tqdm import tqdm
    bar = tqdm(range(start_step, cfg.steps), desc=f"{cfg.mode}", initial=start_step, total=cfg.steps)
    for step in bar:
        t0 = time.time()
        step_prompts = grpo.prompts_for_step(prompts, step, cfg.prompts_per_step, cfg.seed)
        # student rollouts with tools, rewards, GRPO advantages: exactly grpo.py
        counts = Counter()
        model.eval()
        trajs = rollout.rollout(engine, tokenizer, step_prompts, cfg.n, grpo.rollout_config(cfg),
                                rollout.Sampling(cfg.temperature, cfg.top_p), seed=cfg.seed * 100_003 + step, counts=counts)
        model.train()
        row = {"step": step + 1, **grpo.rollout_metrics(trajs, counts), "t_rollout": time.time() - t0,
               "t_tools": counts["tool_seconds"]}
        rewards = torch.tensor([t.reward for t in trajs])                                     # [B]
        grpo_adv = grpo.group_advantages(rewards, torch.tensor([t.prompt_index for t in trajs])).to(device)
        batch = rollout.pad_trajectories(trajs, tokenizer.pad_token_id, device)
        mask = batch["response_mask"]                                                         # [B, T-1]
        t1 = time.time()
        old_logprobs, entropy = grpo.batched_logprobs(model, batch, cfg.micro_batch_size, with_entropy=True)  # l^S [B, T-1]
        row["entropy"] = rollout.masked_mean(entropy, mask).item()
        # what SOD adds: the teacher's log-probs of the same tokens, and the step-weighted signal
        teacher.to(device)
        teacher_lp = teacher_logprobs_for(teacher, tokenizer, trajs, batch, step_prompts, cfg)  # l^T [B, T-1]
        teacher.to(teacher_home)
        advantages, r, w = distill_advantages(cfg.mode, grpo_adv, old_logprobs, teacher_lp, mask, cfg)
        row["t_teacher"] = time.time() - t1
        step_id, d, _ = step_divergence(old_logprobs, teacher_lp, mask)
        records = step_records(trajs, step_id, d, w * mask, step + 1)
        row.update(summarize_steps(records))
        row["teacher_signal_mean"] = rollout.masked_mean(r, mask).item()
        # the PPO update of grpo.py, unchanged
        t2 = time.time()
        row.update(grpo.ppo_update(model, optimizer, batch, advantages, old_logprobs, cfg))
        row["t_train"] = time.time() - t2
        if engine is not model:
            rollout.push_weights_to_vllm(engine, model)
        if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
            row.update(grpo.held_out_eval(model, tokenizer, cfg, engine))
        metrics_file.write(json.dumps(row) + "\n")
        metrics_file.flush()
        rollout.write_jsonl(out_dir / "steps.jsonl", records)
        bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['acc']:.2f}")
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:  # the last one lets --resume extend a run
            grpo.save_run_checkpoint(out_dir, model, tokenizer, optimizer, step + 1, cfg)
    metrics_file.close()
    grpo.report_start_and_end(out_dir / "metrics.jsonl")
    model.eval()
    sft.save_checkpoint(out_dir, "final", model, tokenizer)
    plot_steps(out_dir / "metrics.jsonl", out_dir / "step_weights.png")
    log.info("saved %s", out_dir / "final")
    return model


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(rollout.parse_args(Config))
