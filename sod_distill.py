"""
sod_distill.py: stage 3, step-wise on-policy distillation (SOD) of a small student with tools.

SOD is GRPO (grpo.py) plus a teacher signal on every token the student generated. The student rolls
out with the tool; a frozen teacher scores the *same token ids* (tool responses are context for it,
but carry no signal); the per-token signal is the teacher-student log-prob gap

    r_t = (l^T_t - l^S_t) * m_t,        l^S = log pi_old(y_t | .),  l^T = log pi_teacher(y_t | .)

(minus a one-sample estimate of the reverse KL at t; both log-probs at the sampling temperature).
Plain on-policy distillation (OPD) adds r_t to the GRPO advantage everywhere. SOD first asks, per
assistant turn ("step") k, how far the student has drifted from what the teacher would do,

    d_k = mean_{t in step k} |l^S_t - l^T_t|,

and turns the teacher down on steps that drifted more than the first one did:

    w_1 = 1,   w_k = min( (d_1 + eps) / (d_k + eps), 1 + delta ),
    A_t = A_grpo * m_t + lambda * w_{k(t)} * r_t,

then feeds A_t to grpo.policy_loss unchanged. After a bad tool call the context holds something the
teacher rarely saw (a traceback), its advice there is poor, d_k grows and w_k shrinks.

The authors write w_k as a running product, w_k = min(prod_{u=1}^{k-1} (d_u+eps)/(d_{u+1}+eps), 1+delta),
with the clip applied outside the product (verl/trainer/ppo/ray_trainer.py: compute_stepwise_opd_weights).
The product telescopes: each (d_u + eps) in a numerator cancels the same term in the previous factor's
denominator, leaving (d_1 + eps)/(d_k + eps). So every step is compared with the first one only, and
there is no lower bound (w -> 0 as d_k grows).

This file holds only what distillation adds to grpo.py: the frozen teacher, its log-probs on the student's
ids, the step weights, the advantages of each mode, and the per-step diagnostics. The RL loop itself is
grpo.train, entered through its `advantages_fn` seam.

Modes (--mode): sod (default); opd (w = 1, the OPD baseline); gated (the reference's non-stepwise
variant: A_t = (A_i + beta_i r_t) m_t, beta_i = beta_min + (beta_max - beta_min) sigmoid(-gamma A_i));
opsd_gt / opsd_hint (on-policy *self*-distillation: the teacher is the frozen starting student, shown the
ground-truth answer or the row's `hint` in its prompt, with uniform weights as in OPD; the authors have
no code for these, this definition is inferred from the paper they cite).

Deviation: step_weights is vectorised (the reference loops over tokens with .item()). Reference values:
eps 1e-6, delta 0.2, lambda 1.0 (the dataclass default delta = 0.5 of the authors' code is not what
their SOD script runs).

    python sod_distill.py                                  # toy student, teacher runs/grpo-teacher/final, CPU
    python sod_distill.py --mode opd --out_dir runs/opd-student
    python sod_distill.py --student runs/sft-0.6b/final --teacher youngzhong/SOD-GRPO_teacher-4B \\
        --data Open-AgentRL-30K.parquet --backend vllm --steps 470 --prompts_per_step 64 --n_samples 16 \\
        --lr 1e-6 --max_prompt_tokens 2560 --max_response_tokens 20480 --overlong_buffer 1024 \\
        --micro_batch_size 4 --teacher_offload --tool_junction reference   # the released teacher's junction
"""
import copy
import json
import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import grpo
import rollout
from common import dist, models, study
from common.cli import arg, not_a_flag, run_script
from common.data import Prompt, as_messages, with_user_text, write_jsonl

log = logging.getLogger("sod")
MODES = ("sod", "opd", "gated", "opsd_gt", "opsd_hint")


@dataclass
class Config(grpo.Config):
    """Step-wise on-policy distillation: GRPO plus a per-step weighted teacher signal."""
    student: str = arg("runs/sft-student/final", "the student's starting checkpoint (its SFT model)")
    teacher: str = arg("", "the frozen teacher (empty: runs/grpo-teacher/final; "
                           "the opsd_* modes use the student)")
    mode: str = arg("sod", "sod | opd | gated | opsd_gt | opsd_hint")
    coef: float = arg(1.0, "lambda, weight of the teacher signal in sod, opd and opsd_* (reference 1.0)")
    eps: float = arg(1e-6, "sod: epsilon in the step weights (reference 1e-6)")
    delta: float = arg(0.2, "sod: weights are capped at 1 + delta (reference 0.2)")
    gated_gamma: float = arg(1.0, "gated: gamma")
    gated_beta_min: float = arg(0.0, "gated: beta_min")
    gated_beta_max: float = arg(0.1, "gated: beta_max")
    teacher_offload: bool = arg(False, "keep the teacher on CPU between steps (GPU memory)")
    # grpo.Config fields whose meaning or default differs here
    model: str = not_a_flag("", "the student is --student")
    out_dir: str = arg("runs/sod-student", "checkpoints, metrics.jsonl, steps.jsonl, "
                                           "step_weights.png, final/")


# -----------------------------------------------------------------------------
# ALGO LOGIC: steps, divergences and weights, vectorised over [B, T]

def step_index(response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T] long: k (1-based) for tokens of the k-th maximal run of mask 1, 0 elsewhere."""
    m = response_mask > 0
    # a run starts where the previous token is not in one
    starts = m & ~torch.nn.functional.pad(m[:, :-1], (1, 0), value=False)
    return torch.cumsum(starts.long(), dim=1) * m.long()


def step_divergence(student_logprobs, teacher_logprobs, response_mask):
    """d[b, k] = mean |l^S - l^T| over step k of row b. Returns (step_id [B, T], d [B, K+1]); column 0
    collects the non-step tokens and is never read, and K + 1 >= 2 so that d_1 exists even for a batch with no
    step."""
    step_id = step_index(response_mask)                                              # [B, T]
    B = step_id.shape[0]
    K1 = max(2, int(step_id.max()) + 1 if step_id.numel() else 2)
    # [B*T] one slot per (row, step)
    slot = (torch.arange(B, device=step_id.device)[:, None] * K1 + step_id).reshape(-1)
    gap = (student_logprobs - teacher_logprobs).abs().double().reshape(-1)
    sums = torch.zeros(B * K1, dtype=torch.float64, device=gap.device).index_add_(0, slot, gap).view(B, K1)
    sizes = torch.bincount(slot, minlength=B * K1).view(B, K1)
    return step_id, sums / sizes.clamp(min=1)


def step_weights(d, step_id, eps: float = 1e-6, delta: float = 0.2) -> torch.Tensor:
    """w per token [B, T] from the divergences of step_divergence: tokens of step k get
    min((d_1 + eps) / (d_k + eps), 1 + delta), so w_1 = 1; non-step tokens get 0."""
    w = ((d[:, 1:2] + eps) / (d + eps)).clamp(max=1 + delta)                          # [B, K+1]
    w[:, 1] = 1.0  # (d_1 + eps) / (d_1 + eps), exactly
    return torch.gather(w, 1, step_id) * (step_id > 0)                                # [B, T] float64


def distill_advantages(mode: str, grpo_adv, student_logprobs, teacher_logprobs, response_mask, cfg):
    """The advantage each mode feeds to grpo.policy_loss, with what went into it.
    grpo_adv: [B]; the rest [B, T]. Returns (advantages [B, T], signal r [B, T], weight on r [B, T],
    d [B, K+1], step_id)."""
    m = response_mask
    r = (teacher_logprobs - student_logprobs) * m                            # [B, T] per-token teacher signal
    step_id, d = step_divergence(student_logprobs, teacher_logprobs, m)
    if mode == "sod":
        w = cfg.coef * step_weights(d, step_id, cfg.eps, cfg.delta).to(r.dtype)
    elif mode in ("opd", "opsd_gt", "opsd_hint"):
        # uniform: the OPD baseline, and self-distillation with a privileged teacher
        w = cfg.coef * m
    elif mode == "gated":  # beta_i, per trajectory: wrong samples (A < 0) get more teacher pull
        beta = (cfg.gated_beta_min
                + (cfg.gated_beta_max - cfg.gated_beta_min) * torch.sigmoid(-cfg.gated_gamma * grpo_adv))
        w = beta[:, None].to(r.dtype) * m
    else:
        raise ValueError(f"unknown mode {mode!r}")
    return grpo_adv[:, None] * m + w * r, r, w, d, step_id


# -----------------------------------------------------------------------------
# The teacher's view: the same response ids, behind the student's prompt or a privileged one

def privileged_prompt(prompt: Prompt, mode: str) -> list[dict]:
    """The prompt's messages, with extra text at the end of its user message for the opsd_* teachers (an
    inferred definition, see the docstring)."""
    if mode == "opsd_gt":
        extra = f"\n(The correct final answer is {prompt.ground_truth}.)"
    elif not prompt.hint:
        raise SystemExit("--mode opsd_hint needs a `hint` column in the data rows (the toy rows carry one)")
    else:
        extra = f"\n(Hint: {prompt.hint}.)"
    return with_user_text(as_messages(prompt.prompt), lambda text: text + extra)


@torch.no_grad()
def teacher_logprobs_for(teacher, tokenizer, trajs, batch, prompts, cfg) -> torch.Tensor:
    """l^T on the student's response tokens, in the student batch's [B, T-1] label layout."""
    if cfg.mode in ("sod", "opd", "gated"):
        # the very same input ids
        return grpo.batched_logprobs(teacher, batch, cfg.micro_batch_size, cfg.temperature)
    teacher_trajs = [copy.copy(t) for t in trajs]
    for t in teacher_trajs:
        t.prompt_ids = rollout.render_prompt_ids(tokenizer,
                                                 privileged_prompt(prompts[t.prompt_index], cfg.mode))
    tb = rollout.pad_trajectories(teacher_trajs, tokenizer.pad_token_id, batch.input_ids.device)
    lp = grpo.batched_logprobs(teacher, tb, cfg.micro_batch_size, cfg.temperature)
    out = torch.zeros_like(batch.response_mask)
    # move each response's slice to the student's positions
    for b, (s, t) in enumerate(zip(trajs, teacher_trajs)):
        n = len(s.response_ids)
        out[b, len(s.prompt_ids) - 1:len(s.prompt_ids) - 1 + n] = (
            lp[b, len(t.prompt_ids) - 1:len(t.prompt_ids) - 1 + n])
    return out


# -----------------------------------------------------------------------------
# Diagnostics: per-step records, a per-RL-step summary, a picture

def step_records(trajs, step_id, d, w, r, rl_step) -> list[dict]:
    """One record per (trajectory, assistant turn): tokens, d_k, the weight on the teacher signal, the mean
    signal, the tool call and its status, the reward."""
    K1 = d.shape[1]
    w_step = torch.zeros_like(d).scatter_reduce_(1, step_id, w.double(), reduce="amax",
                                                 include_self=False)             # [B, K+1]
    r_step = torch.zeros_like(d).scatter_add_(1, step_id, r.double())             # [B, K+1] sum of r per step
    records = []
    for b, t in enumerate(trajs):
        for k, turn in enumerate(t.turns[:len(t.steps)], start=1):
            if k >= K1:
                break
            records.append({"rl_step": rl_step, "traj": b, "step": k, "tokens": turn.tokens,
                            "d": d[b, k].item(), "w": w_step[b, k].item(),
                            "signal": r_step[b, k].item() / max(turn.tokens, 1),
                            "tool_call": turn.tool_call, "tool_status": turn.tool_status,
                            "after_tool_error": any(x.tool_status == "error" for x in t.turns[:k - 1]),
                            "previous_failure": previous_failure(t.turns, k),
                            "reward": t.reward})
    return records


def previous_failure(turns: list, k: int) -> str | None:
    """Why the call of turn k - 1 (a rollout.Turn) failed, if it did: "sandbox" (a transient failure of the
    sandbox, the toy's --tool_failure_rate) or "code" (the model's code raised); None if it did not fail or if
    k = 1."""
    if k == 1 or turns[k - 2].tool_status != "error":
        return None
    return "sandbox" if turns[k - 2].sandbox_failure else "code"


def summarize_steps(records: list[dict]) -> dict:
    """Per-RL-step metrics from the step records: mean w_k and d_k per turn index, and around tool errors."""
    by_k = defaultdict(list)
    for r in records:
        by_k[r["step"]].append(r)
    out = {f"w_mean/step{k}": float(np.mean([r["w"] for r in rs]))
           for k, rs in sorted(by_k.items()) if k <= 8}
    out.update({f"d_mean/step{k}": float(np.mean([r["d"] for r in rs]))
                for k, rs in sorted(by_k.items()) if k <= 8})
    later = [r for r in records if r["step"] > 1]
    out["frac_w_below_0.5"] = float(np.mean([r["w"] < 0.5 for r in later])) if later else 0.0
    out["d1_mean"] = float(np.mean([r["d"] for r in by_k[1]])) if by_k[1] else 0.0
    tokens = sum(r["tokens"] for r in records)
    out["teacher_signal_mean"] = sum(r["signal"] * r["tokens"] for r in records) / max(tokens, 1)
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
        axes[0].plot(ks, [r[f"w_mean/step{k}"] for k in ks], marker="o", color=color,
                     label=f"RL step {r['step']}")
        axes[1].plot(ks, [r[f"d_mean/step{k}"] for k in ks], marker="o", color=color)
    axes[0].legend(fontsize=7)
    study.finish_step_axes(fig, axes[0], axes[1], png_path)
    plt.close(fig)


# -----------------------------------------------------------------------------

def check_flags(cfg: Config):
    """Reject the flags that this mode would ignore."""
    default = Config()
    if cfg.mode not in MODES:
        raise SystemExit(f"--mode must be one of {', '.join(MODES)}, not {cfg.mode!r}")
    if cfg.model:  # a Config built in code: the command line has no --model here
        raise SystemExit("sod_distill.py takes the student as --student, not --model")
    owners = {"eps": ("sod",), "delta": ("sod",), "coef": ("sod", "opd", "opsd_gt", "opsd_hint"),
              "gated_gamma": ("gated",), "gated_beta_min": ("gated",), "gated_beta_max": ("gated",)}
    for name, modes in owners.items():
        if getattr(cfg, name) != getattr(default, name) and cfg.mode not in modes:
            raise SystemExit(f"--{name} applies to --mode {' / '.join(modes)}, not to --mode {cfg.mode}")
    if cfg.mode.startswith("opsd") and cfg.teacher:
        raise SystemExit(f"--mode {cfg.mode} distils from the frozen starting student: --teacher is not used")


def main(cfg: Config):
    check_flags(cfg)
    tokenizer = models.load_tokenizer(cfg.student)
    # opsd_* modes: the teacher is a frozen copy of the starting student, shown a privileged prompt
    teacher_path = cfg.student if cfg.mode.startswith("opsd") else cfg.teacher or "runs/grpo-teacher/final"
    models.check_same_tokenizer(tokenizer, models.load_tokenizer(teacher_path), cfg.student, teacher_path)
    teacher = None  # loaded at the first step, on the device of the batch, and replicated on every rank

    def advantages_fn(step_prompts, trajs, batch, old_logprobs, grpo_adv, rl_step):
        """What SOD adds to the GRPO step: the teacher's log-probs of the same tokens, and the weighted
        signal. Writes the step's per-turn records to steps.jsonl and returns their summary."""
        nonlocal teacher
        device, home = batch.input_ids.device, "cpu" if cfg.teacher_offload else batch.input_ids.device
        if teacher is None:
            # bf16 on GPU, fp32 on CPU
            teacher = models.load_model(teacher_path, device=home).requires_grad_(False)
        teacher.to(device)
        teacher_lp = teacher_logprobs_for(teacher, tokenizer, trajs, batch, step_prompts, cfg)  # l^T [B, T-1]
        teacher.to(home)
        mask = batch.response_mask                                                          # [B, T-1]
        advantages, r, w, d, step_id = distill_advantages(cfg.mode, grpo_adv, old_logprobs, teacher_lp,
                                                          mask, cfg)
        records = step_records(trajs, step_id, d, w, r, rl_step)
        for rec in records:  # this rank's row -> its position among the step's kept trajectories
            rec["traj"] = batch.positions[rec["traj"]]
        records = sorted((rec for part in dist.all_gather(records, ranks) for rec in part),
                         key=lambda rec: (rec["traj"], rec["step"]))
        if ranks.main:
            write_jsonl(Path(cfg.out_dir) / "steps.jsonl", records)
        return advantages, summarize_steps(records)

    ranks = dist.this_process()
    model = grpo.train(cfg, cfg.student, advantages_fn, name=cfg.mode)
    if ranks.main:
        plot_steps(Path(cfg.out_dir) / "metrics.jsonl", Path(cfg.out_dir) / "step_weights.png")
    return model


if __name__ == "__main__":
    run_script(main, Config)
